/* Drives an edu DMA engine (QEMU's, or the VMM's `--edu`; 1234:11e8) from a guest's user space
 * through VFIO, so the guest kernel's IOMMU driver maps and unmaps every buffer the device
 * reaches: each round maps a source and a destination page at fixed IOVAs, has edu copy the
 * source into its buffer and back out to the destination, unmaps both and compares (the next
 * round maps the same IOVAs again, to fresh data). The device is bound to vfio-pci first (the
 * vfio modules loaded).
 * Usage: edu-dma ROUNDS   prints one "edu-dma ..." line per failing round or step and a summary
 * line "edu-dma rounds=N ok=M bdf=B" (the action turns them into markers). Built static by
 * build.sh. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/vfio.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

/* edu's registers (QEMU docs/specs/edu.rst) and buffer, in BAR0. */
#define EDU_DMA_SRC 0x80
#define EDU_DMA_DST 0x88
#define EDU_DMA_CNT 0x90
#define EDU_DMA_CMD 0x98
#define EDU_BUF 0x40000
#define CMD_START 1
#define CMD_TO_RAM 2
/* The IOVAs the rounds map (edu reaches 28 bits). */
#define IOVA_SRC 0x100000
#define IOVA_DST 0x200000
#define PAGE 4096

static int write_file(const char *path, const char *s) {
  int fd = open(path, O_WRONLY);
  if (fd < 0) return -1;
  ssize_t n = write(fd, s, strlen(s));
  close(fd);
  return n == (ssize_t)strlen(s) ? 0 : -1;
}

/* Finds edu's PCI address (DDDD:BB:DD.F) in sysfs. */
static int find_edu(char *bdf, size_t len) {
  DIR *d = opendir("/sys/bus/pci/devices");
  struct dirent *e;
  if (!d) return -1;
  while ((e = readdir(d))) {
    char path[512], id[32] = {0};
    if (e->d_name[0] == '.') continue;
    snprintf(path, sizeof path, "/sys/bus/pci/devices/%s/vendor", e->d_name);
    FILE *f = fopen(path, "r");
    if (!f) continue;
    char *got = fgets(id, sizeof id, f);
    fclose(f);
    if (!got || strncmp(id, "0x1234", 6)) continue;
    snprintf(path, sizeof path, "/sys/bus/pci/devices/%s/device", e->d_name);
    f = fopen(path, "r");
    if (!f) continue;
    got = fgets(id, sizeof id, f);
    fclose(f);
    if (got && !strncmp(id, "0x11e8", 6)) {
      snprintf(bdf, len, "%s", e->d_name);
      closedir(d);
      return 0;
    }
  }
  closedir(d);
  return -1;
}

static int fail(const char *what) {
  printf("edu-dma error %s errno=%d\n", what, errno);
  return 1;
}

static void dma_map(int container, void *va, uint64_t iova) {
  struct vfio_iommu_type1_dma_map m = {
      .argsz = sizeof m,
      .flags = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
      .vaddr = (uintptr_t)va,
      .iova = iova,
      .size = PAGE,
  };
  if (ioctl(container, VFIO_IOMMU_MAP_DMA, &m)) printf("edu-dma error map iova=%#llx errno=%d\n",
                                                       (unsigned long long)iova, errno);
}

static void dma_unmap(int container, uint64_t iova) {
  struct vfio_iommu_type1_dma_unmap u = {.argsz = sizeof u, .iova = iova, .size = PAGE};
  if (ioctl(container, VFIO_IOMMU_UNMAP_DMA, &u)) printf("edu-dma error unmap iova=%#llx errno=%d\n",
                                                         (unsigned long long)iova, errno);
}

/* One edu transfer of `len` bytes; edu finishes it before the command write returns (ours) or
 * soon after (QEMU's): wait for the start bit to clear. */
static void edu_dma(volatile uint8_t *bar, uint64_t src, uint64_t dst, uint64_t len, int to_ram) {
  *(volatile uint64_t *)(bar + EDU_DMA_SRC) = src;
  *(volatile uint64_t *)(bar + EDU_DMA_DST) = dst;
  *(volatile uint64_t *)(bar + EDU_DMA_CNT) = len;
  *(volatile uint64_t *)(bar + EDU_DMA_CMD) = CMD_START | (to_ram ? CMD_TO_RAM : 0);
  for (long i = 0; i < 100000000 && (*(volatile uint64_t *)(bar + EDU_DMA_CMD) & CMD_START); i++)
    ;
}

int main(int argc, char **argv) {
  long rounds = argc > 1 ? strtol(argv[1], NULL, 0) : 16;
  char bdf[256], path[512], link[512];
  if (find_edu(bdf, sizeof bdf)) return fail("no-edu");
  snprintf(path, sizeof path, "/sys/bus/pci/devices/%s/driver_override", bdf);
  if (write_file(path, "vfio-pci")) return fail("driver-override");
  snprintf(path, sizeof path, "/sys/bus/pci/devices/%s/driver/unbind", bdf);
  write_file(path, bdf); /* not bound yet is fine */
  if (write_file("/sys/bus/pci/drivers_probe", bdf)) return fail("probe");
  snprintf(path, sizeof path, "/sys/bus/pci/devices/%s/iommu_group", bdf);
  ssize_t n = readlink(path, link, sizeof link - 1);
  if (n < 0) return fail("iommu-group");
  link[n] = 0;
  snprintf(path, sizeof path, "/dev/vfio/%s", strrchr(link, '/') + 1);
  int container = open("/dev/vfio/vfio", O_RDWR);
  int group = open(path, O_RDWR);
  if (container < 0 || group < 0) return fail("open-vfio");
  if (ioctl(container, VFIO_GET_API_VERSION) != VFIO_API_VERSION) return fail("api");
  if (ioctl(group, VFIO_GROUP_SET_CONTAINER, &container)) return fail("set-container");
  if (ioctl(container, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU)) return fail("set-iommu");
  int dev = ioctl(group, VFIO_GROUP_GET_DEVICE_FD, bdf);
  if (dev < 0) return fail("device-fd");
  struct vfio_region_info bar0 = {.argsz = sizeof bar0, .index = VFIO_PCI_BAR0_REGION_INDEX};
  struct vfio_region_info cfg = {.argsz = sizeof cfg, .index = VFIO_PCI_CONFIG_REGION_INDEX};
  if (ioctl(dev, VFIO_DEVICE_GET_REGION_INFO, &bar0) ||
      ioctl(dev, VFIO_DEVICE_GET_REGION_INFO, &cfg))
    return fail("region-info");
  /* Memory decoding and bus mastering. */
  uint16_t command = 0;
  if (pread(dev, &command, 2, cfg.offset + 4) != 2) return fail("config-read");
  command |= 0x6;
  if (pwrite(dev, &command, 2, cfg.offset + 4) != 2) return fail("config-write");
  volatile uint8_t *bar =
      mmap(NULL, bar0.size, PROT_READ | PROT_WRITE, MAP_SHARED, dev, bar0.offset);
  if (bar == MAP_FAILED) return fail("mmap-bar0");
  uint8_t *src = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  uint8_t *dst = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (src == MAP_FAILED || dst == MAP_FAILED) return fail("mmap-buffers");
  long ok = 0;
  for (long r = 0; r < rounds; r++) {
    for (int i = 0; i < PAGE; i++) src[i] = (uint8_t)(i * 7 + r * 13 + 1);
    memset(dst, 0, PAGE);
    dma_map(container, src, IOVA_SRC);
    dma_map(container, dst, IOVA_DST);
    edu_dma(bar, IOVA_SRC, EDU_BUF, PAGE, 0);
    edu_dma(bar, EDU_BUF, IOVA_DST, PAGE, 1);
    dma_unmap(container, IOVA_SRC);
    dma_unmap(container, IOVA_DST);
    if (memcmp(src, dst, PAGE) == 0) {
      ok++;
    } else {
      int first = 0;
      while (first < PAGE && src[first] == dst[first]) first++;
      printf("edu-dma mismatch round=%ld first=%d\n", r, first);
    }
  }
  printf("edu-dma rounds=%ld ok=%ld bdf=%s\n", rounds, ok, bdf);
  return ok == rounds ? 0 : 1;
}
