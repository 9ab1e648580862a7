// The floor of a snapshot in the benchmarks (bench/snapshot.ts compiles and runs it): the
// least a store of one file per object can do, in plain C, with the syscalls disksnap issues
// and nothing else — no hashing, no manifest, no records.
//
//   floor SRC OFFSET LENGTH OBJSIZE DIR THREADS WRITES [WRITESIZE]
//
// Reads [OFFSET, OFFSET+LENGTH) of SRC in OBJSIZE pieces (pread through the page cache, into a
// page-aligned buffer per thread, as a snapshot reads its volume) and stores WRITES of those
// pieces, spread evenly, each as an object in DIR/<xx>/ (256 directories, created first):
// O_TMPFILE, O_DIRECT write, fdatasync, linkat; then one fsync per directory. THREADS threads
// take pieces in turn. With WRITESIZE, each stored object is the first WRITESIZE bytes of its
// piece (objects smaller than the pieces read: an incremental's 64 KiB granules). Prints the
// seconds taken, from the first read to the last fsync.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static const char* src;
static const char* dir;
static uint64_t offset, length, objsize, writes, pieces, writesize;
static atomic_uint_fast64_t next;

static void die(const char* what, const char* path) {
  fprintf(stderr, "floor: %s %s: %s\n", what, path ? path : "", strerror(errno));
  exit(1);
}

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int stored(uint64_t k) {
  return (k * writes) / pieces != ((k + 1) * writes) / pieces;
}

static void put(uint64_t k, const uint8_t* buf, size_t len) {
  char d[4096], p[4096], self[64];
  snprintf(d, sizeof d, "%s/%02x", dir, (unsigned)(k % 256));
  snprintf(p, sizeof p, "%s/%016llx", d, (unsigned long long)k);
  int direct = len % 4096 == 0 ? O_DIRECT : 0;
  int fd = open(d, O_TMPFILE | O_WRONLY | O_CLOEXEC | direct, 0644);
  if (fd < 0) die("open", d);
  size_t done = 0;
  while (done < len) {
    ssize_t w = pwrite(fd, buf + done, len - done, (off_t)done);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) die("pwrite", d);
    done += (size_t)w;
  }
  if (fdatasync(fd)) die("fdatasync", d);
  snprintf(self, sizeof self, "/proc/self/fd/%d", fd);
  if (linkat(AT_FDCWD, self, AT_FDCWD, p, AT_SYMLINK_FOLLOW)) die("linkat", p);
  close(fd);
}

static void* worker(void* arg) {
  (void)arg;
  uint8_t* buf;
  if (posix_memalign((void**)&buf, 4096, objsize)) die("posix_memalign", NULL);
  int in = open(src, O_RDONLY | O_CLOEXEC);
  if (in < 0) die("open", src);
  for (;;) {
    uint64_t k = atomic_fetch_add(&next, 1);
    if (k >= pieces) break;
    uint64_t at = k * objsize;
    size_t len = (size_t)(length - at < objsize ? length - at : objsize);
    size_t got = 0;
    while (got < len) {
      ssize_t r = pread(in, buf + got, len - got, (off_t)(offset + at + got));
      if (r < 0 && errno == EINTR) continue;
      if (r < 0) die("pread", src);
      if (r == 0) break;
      got += (size_t)r;
    }
    if (stored(k)) put(k, buf, len < writesize ? len : (size_t)writesize);
  }
  close(in);
  free(buf);
  return NULL;
}

int main(int argc, char** argv) {
  if (argc != 8 && argc != 9) {
    fprintf(stderr, "usage: floor SRC OFFSET LENGTH OBJSIZE DIR THREADS WRITES [WRITESIZE]\n");
    return 2;
  }
  src = argv[1];
  offset = strtoull(argv[2], NULL, 0);
  length = strtoull(argv[3], NULL, 0);
  objsize = strtoull(argv[4], NULL, 0);
  dir = argv[5];
  int threads = atoi(argv[6]);
  writes = strtoull(argv[7], NULL, 0);
  writesize = argc == 9 ? strtoull(argv[8], NULL, 0) : objsize;
  if (writesize == 0 || writesize > objsize) writesize = objsize;
  if (objsize == 0 || threads < 1 || threads > 256) return 2;
  pieces = (length + objsize - 1) / objsize;
  if (writes > pieces) writes = pieces;
  if (mkdir(dir, 0755) && errno != EEXIST) die("mkdir", dir);
  for (int k = 0; k < 256; k++) {
    char d[4096];
    snprintf(d, sizeof d, "%s/%02x", dir, k);
    if (mkdir(d, 0755) && errno != EEXIST) die("mkdir", d);
  }
  double t0 = now();
  pthread_t th[256];
  for (int k = 0; k < threads; k++) pthread_create(&th[k], NULL, worker, NULL);
  for (int k = 0; k < threads; k++) pthread_join(th[k], NULL);
  for (int k = 0; k < 256; k++) {
    char d[4096];
    snprintf(d, sizeof d, "%s/%02x", dir, k);
    int fd = open(d, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0 || fsync(fd)) die("fsync", d);
    close(fd);
  }
  printf("%.6f\n", now() - t0);
  return 0;
}
