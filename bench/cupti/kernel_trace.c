// kernel_trace: a CUPTI injection library that records every GPU kernel, memcpy and memset of a
// process and, at exit, writes one line per kernel name: calls, total and mean time. It needs no
// change to the program traced, so flare and the PyTorch anchors are profiled the same way:
//
//   CUDA_INJECTION64_PATH=/path/libkernel_trace.so FLARE_TRACE_OUT=trace.tsv  <program>
//
// Output (tab-separated, sorted by total time): total_ns, calls, kind, name (mangled; see
// bench/kernel_report.py). Built by scripts/build-kernel-trace.sh against CUPTI from PyPI.
#include <cupti.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define BUF_SIZE (8u << 20)
#define MAX_NAMES 4096

typedef struct {
  char *name;
  const char *kind;
  uint64_t calls;
  uint64_t total_ns;
} Entry;

static Entry entries[MAX_NAMES];
static int n_entries;
static uint64_t dropped;

static void add(const char *kind, const char *name, uint64_t ns) {
  for (int i = 0; i < n_entries; i++) {
    if (entries[i].kind == kind && strcmp(entries[i].name, name) == 0) {
      entries[i].calls++;
      entries[i].total_ns += ns;
      return;
    }
  }
  if (n_entries == MAX_NAMES) {
    dropped++;
    return;
  }
  entries[n_entries].name = strdup(name);
  entries[n_entries].kind = kind;
  entries[n_entries].calls = 1;
  entries[n_entries].total_ns = ns;
  n_entries++;
}

static void CUPTIAPI buffer_requested(uint8_t **buffer, size_t *size, size_t *max_records) {
  *buffer = (uint8_t *)aligned_alloc(8, BUF_SIZE);
  *size = *buffer ? BUF_SIZE : 0;
  *max_records = 0;
}

static void CUPTIAPI buffer_completed(CUcontext ctx, uint32_t stream, uint8_t *buffer,
                                      size_t size, size_t valid) {
  (void)ctx;
  (void)stream;
  (void)size;
  CUpti_Activity *rec = NULL;
  while (cuptiActivityGetNextRecord(buffer, valid, &rec) == CUPTI_SUCCESS) {
    switch (rec->kind) {
    case CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL:
    case CUPTI_ACTIVITY_KIND_KERNEL: {
      CUpti_ActivityKernel10 *k = (CUpti_ActivityKernel10 *)rec;
      // Every name carries its grid, which tells the size a kernel ran on (Candle's elementwise
      // kernels, one cuBLAS kernel on several GEMM shapes).
      char named[512];
      snprintf(named, sizeof named, "%.400s grid %ux%ux%u", k->name ? k->name : "?",
               (unsigned)k->gridX, (unsigned)k->gridY, (unsigned)k->gridZ);
      add("kernel", named, k->end - k->start);
      break;
    }
    case CUPTI_ACTIVITY_KIND_MEMCPY: {
      CUpti_ActivityMemcpy6 *m = (CUpti_ActivityMemcpy6 *)rec;
      // Named by direction, source memory kind (CUpti_ActivityMemoryKind: 1 pageable, 2 pinned,
      // 3 device) and size, so the copies of one call site group together.
      char name[96];
      snprintf(name, sizeof name, "memcpy kind %u src %u bytes %llu", (unsigned)m->copyKind,
               (unsigned)m->srcKind, (unsigned long long)m->bytes);
      add("memcpy", name, m->end - m->start);
      break;
    }
    case CUPTI_ACTIVITY_KIND_MEMSET: {
      CUpti_ActivityMemset4 *m = (CUpti_ActivityMemset4 *)rec;
      add("memset", "memset", m->end - m->start);
      break;
    }
    default:
      break;
    }
  }
  free(buffer);
}

static int by_total(const void *a, const void *b) {
  const Entry *x = a, *y = b;
  return x->total_ns < y->total_ns ? 1 : x->total_ns > y->total_ns ? -1 : 0;
}

static void report(void) {
  cuptiActivityFlushAll(1);
  const char *path = getenv("FLARE_TRACE_OUT");
  FILE *f = path ? fopen(path, "w") : stderr;
  if (!f) {
    fprintf(stderr, "kernel_trace: cannot open %s\n", path);
    return;
  }
  qsort(entries, n_entries, sizeof(Entry), by_total);
  for (int i = 0; i < n_entries; i++)
    fprintf(f, "%llu\t%llu\t%s\t%s\n", (unsigned long long)entries[i].total_ns,
            (unsigned long long)entries[i].calls, entries[i].kind, entries[i].name);
  if (dropped)
    fprintf(f, "0\t%llu\tdropped\tmore than %d names\n", (unsigned long long)dropped, MAX_NAMES);
  if (f != stderr)
    fclose(f);
}

// Called by the CUDA driver when CUDA_INJECTION64_PATH names this library.
int InitializeInjection(void) {
  if (cuptiActivityRegisterCallbacks(buffer_requested, buffer_completed) != CUPTI_SUCCESS) {
    fprintf(stderr, "kernel_trace: cuptiActivityRegisterCallbacks failed\n");
    return 0;
  }
  cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL);
  cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMCPY);
  cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMSET);
  atexit(report);
  return 1;
}
