/*
 * diskread DEVICE seq|rand [COUNT]: times reads of DEVICE with O_DIRECT (so
 * every read reaches the virtio disk, not the guest's page cache) and
 * prints one line for the benchmark:
 *   KILN-DISK <mode> bytes=<n> ns=<elapsed>
 * seq reads the whole device in 1 MiB requests; rand makes COUNT (default
 * 2000) 4 KiB reads at offsets from a fixed-seed xorshift, the same
 * sequence on every run and backend.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define SEQ_BLOCK (1 << 20)
#define RAND_BLOCK 4096

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int fail(const char *what)
{
	perror(what);
	return 1;
}

int main(int argc, char **argv)
{
	if (argc < 3)
		return fprintf(stderr, "usage: diskread DEVICE seq|rand [COUNT]\n"), 2;
	int fd = open(argv[1], O_RDONLY | O_DIRECT);
	if (fd < 0)
		return fail(argv[1]);
	off_t end = lseek(fd, 0, SEEK_END); /* a block device's size too */
	if (end <= 0)
		return fail("lseek");
	uint64_t size = (uint64_t)end;
	void *buf;
	if (posix_memalign(&buf, 4096, SEQ_BLOCK) != 0)
		return fail("posix_memalign");
	uint64_t bytes = 0, started = now_ns();
	if (strcmp(argv[2], "seq") == 0) {
		for (uint64_t at = 0; at < size; at += SEQ_BLOCK) {
			ssize_t n = pread(fd, buf, SEQ_BLOCK, (off_t)at);
			if (n <= 0)
				return fail("pread");
			bytes += (uint64_t)n;
		}
	} else if (strcmp(argv[2], "rand") == 0) {
		long count = argc > 3 ? atol(argv[3]) : 2000;
		uint64_t x = 0x9e3779b97f4a7c15u, blocks = size / RAND_BLOCK;
		for (long i = 0; i < count; i++) {
			x ^= x << 13;
			x ^= x >> 7;
			x ^= x << 17;
			off_t at = (off_t)(x % blocks) * RAND_BLOCK;
			if (pread(fd, buf, RAND_BLOCK, at) != RAND_BLOCK)
				return fail("pread");
			bytes += RAND_BLOCK;
		}
	} else {
		return fprintf(stderr, "diskread: unknown mode %s\n", argv[2]), 2;
	}
	printf("KILN-DISK %s bytes=%llu ns=%llu\n", argv[2], (unsigned long long)bytes,
	       (unsigned long long)(now_ns() - started));
	return 0;
}
