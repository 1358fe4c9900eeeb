/* Times N 32-bit accesses to one physical address through /dev/mem, from inside a guest: with the
 * address a device register, each access is a VM exit, and the time per access is what that exit
 * costs (where the exit is handled decides it: guest memory, the host kernel, or the VMM).
 * Usage: mmio-cost ADDR r|w N [VALUE]   prints "ns_per_access=X". Built static by build.sh. */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static double now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e9 + t.tv_nsec;
}

int main(int argc, char **argv) {
  if (argc < 4) {
    fprintf(stderr, "usage: mmio-cost ADDR r|w N [VALUE]\n");
    return 2;
  }
  uint64_t addr = strtoull(argv[1], NULL, 0);
  int write = argv[2][0] == 'w';
  long n = strtol(argv[3], NULL, 0);
  uint32_t value = argc > 4 ? (uint32_t)strtoul(argv[4], NULL, 0) : 0;
  int fd = open("/dev/mem", O_RDWR | O_SYNC);
  if (fd < 0) {
    perror("/dev/mem");
    return 1;
  }
  long page = sysconf(_SC_PAGESIZE);
  uint64_t base = addr & ~(uint64_t)(page - 1);
  volatile uint8_t *map = mmap(NULL, page, PROT_READ | PROT_WRITE, MAP_SHARED, fd, base);
  if (map == MAP_FAILED) {
    perror("mmap");
    return 1;
  }
  volatile uint32_t *reg = (volatile uint32_t *)(map + (addr - base));
  uint32_t sink = 0;
  double start = now_ns();
  for (long i = 0; i < n; i++) {
    if (write)
      *reg = value;
    else
      sink += *reg;
  }
  double end = now_ns();
  printf("ns_per_access=%.0f sink=%u\n", (end - start) / n, sink);
  return 0;
}
