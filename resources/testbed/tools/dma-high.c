/* DMA above 4 GiB: a block device read or written with O_DIRECT through buffers whose every page
 * lies above 4 GiB of the guest's physical memory (checked in /proc/self/pagemap, which needs
 * root), so the device's DMA must reach guest-physical addresses no 32-bit address can name.
 * The buffers are 128 KiB windows of a locked 64 MiB pool, kept only when all their pages are
 * high; the physical addresses are checked again after the I/O (they must not have moved).
 * Usage: dma-high read DEV BYTES          the data on stdout (pipe it to md5sum)
 *        dma-high write DEV OFFSET BYTES  writes "tb-high-pattern\n" repeated at OFFSET, reads it
 *                                         back into other high windows and compares
 * One summary line on stderr: "dma-high op=OP bytes=N windows=W minpa=0x.. maxpa=0x.. ok=0|1".
 * Built static by build.sh. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define PAGE 4096UL
#define WINDOW (128UL * 1024)
#define POOL (64UL << 20)
#define FOUR_GIB (1ULL << 32)
#define MAX_WINDOWS 32

static uint64_t minpa = UINT64_MAX, maxpa;

/* The physical address of the page at `va`, or 0 when it is not present. */
static uint64_t phys(int pagemap, const void *va) {
  uint64_t e;
  off_t at = (off_t)((uintptr_t)va / PAGE) * 8;
  if (pread(pagemap, &e, 8, at) != 8 || !(e & (1ULL << 63))) return 0;
  return (e & ((1ULL << 55) - 1)) * PAGE;
}

/* Whether every page of the window at `w` is present above 4 GiB (recording the extremes). */
static int high(int pagemap, const char *w) {
  for (unsigned long off = 0; off < WINDOW; off += PAGE) {
    uint64_t pa = phys(pagemap, w + off);
    if (pa < FOUR_GIB) return 0;
    if (pa < minpa) minpa = pa;
    if (pa + PAGE > maxpa) maxpa = pa + PAGE;
  }
  return 1;
}

int main(int argc, char **argv) {
  if (argc < 4 || (strcmp(argv[1], "read") && strcmp(argv[1], "write")) ||
      (!strcmp(argv[1], "write") && argc < 5)) {
    fprintf(stderr, "usage: dma-high read DEV BYTES | dma-high write DEV OFFSET BYTES\n");
    return 2;
  }
  int writing = !strcmp(argv[1], "write");
  unsigned long long offset = writing ? strtoull(argv[3], 0, 0) : 0;
  unsigned long long bytes = strtoull(argv[writing ? 4 : 3], 0, 0);
  if (bytes % WINDOW || offset % PAGE) {
    fprintf(stderr, "dma-high: BYTES must be a multiple of %lu and OFFSET of %lu\n", WINDOW, PAGE);
    return 2;
  }
  int pagemap = open("/proc/self/pagemap", O_RDONLY);
  int dev = open(argv[2], (writing ? O_RDWR : O_RDONLY) | O_DIRECT);
  if (pagemap < 0 || dev < 0) {
    perror("dma-high: open");
    return 1;
  }
  char *pool = mmap(0, POOL, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
  if (pool == MAP_FAILED || mlock(pool, POOL)) {
    perror("dma-high: pool");
    return 1;
  }
  memset(pool, 0x5a, POOL); /* distinct pages, each faulted in */
  char *win[MAX_WINDOWS];
  int n = 0;
  for (unsigned long off = 0; off < POOL && n < MAX_WINDOWS; off += WINDOW)
    if (high(pagemap, pool + off)) win[n++] = pool + off;
  if (n < 2) {
    fprintf(stderr, "dma-high op=%s bytes=0 windows=%d ok=0 (no 128 KiB window above 4 GiB)\n", argv[1], n);
    return 1;
  }
  int ok = 1;
  unsigned long long done = 0;
  if (!writing) {
    for (; done < bytes; done += WINDOW) {
      char *w = win[(done / WINDOW) % n];
      if (pread(dev, w, WINDOW, done) != (ssize_t)WINDOW || fwrite(w, 1, WINDOW, stdout) != WINDOW) {
        perror("dma-high: read");
        ok = 0;
        break;
      }
    }
  } else {
    static const char pat[] = "tb-high-pattern\n";
    for (; done < bytes && ok; done += WINDOW) {
      char *src = win[(done / WINDOW) % (n / 2)], *back = win[n / 2 + (done / WINDOW) % (n - n / 2)];
      for (unsigned long i = 0; i < WINDOW; i++) src[i] = pat[i % (sizeof pat - 1)];
      memset(back, 0, WINDOW);
      if (pwrite(dev, src, WINDOW, offset + done) != (ssize_t)WINDOW || fdatasync(dev) ||
          pread(dev, back, WINDOW, offset + done) != (ssize_t)WINDOW) {
        perror("dma-high: write");
        ok = 0;
      } else if (memcmp(src, back, WINDOW)) {
        fprintf(stderr, "dma-high: read-back differs at %llu\n", offset + done);
        ok = 0;
      }
    }
  }
  fflush(stdout);
  /* The windows stayed where they were checked (mlock keeps them; this proves it). */
  for (int i = 0; i < n; i++)
    if (!high(pagemap, win[i])) ok = 0;
  fprintf(stderr, "dma-high op=%s bytes=%llu windows=%d minpa=%#llx maxpa=%#llx ok=%d\n", argv[1], done, n,
          (unsigned long long)minpa, (unsigned long long)maxpa, ok);
  return ok ? 0 : 1;
}
