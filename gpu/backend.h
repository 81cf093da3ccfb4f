/* backend.h — the CUDA backend ("Memory Parallel"): routing keys mirrored from
 * the index into device memory, split over shards (one per GPU, or N slices of
 * one GPU with --gpu-shards), kept in step with the index lazily (appends,
 * deletes and compaction are applied by the first query that sees them, under
 * the collection's read lock, so a mirror always equals the index the query's
 * snapshot reads), paged out least-recently-used past --gpu-routing-gb and
 * streamed through the device when a layer does not fit (answers stay exact),
 * concurrent queries of one (collection, layer) coalesced into one pass, and
 * Attend served from a K/V block cache in device memory.
 *
 * Plugs into the index as its accelerator (msa_idx_set_accel). Thread-safe.
 */
#ifndef MSA_GPU_BACKEND_H
#define MSA_GPU_BACKEND_H

#include "dev.h"
#include "index.h"
#include "msa_err.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct msa_gpu msa_gpu_t;

typedef struct msa_gpu_config {
    msa_dev_config_t dev;    /* the device layer: CUDA or the simulated device (tests) */
    unsigned shards_per_gpu; /* >= 1: shards each GPU's keys are cut into */
    uint64_t
        routing_bytes; /* per GPU budget for resident routing keys; 0 = 75% of free (100M tokens of MSA-4B BF16 keys fit an 80 GB GPU) */
    uint64_t cache_bytes;    /* per GPU K/V block cache; 0 = 12% of free */
    bool cache_off;          /* no K/V cache (every Attend copies its blocks) */
    unsigned coalesce_us;    /* longest wait to batch concurrent queries; 0 = no waiting */
    unsigned evict_grace_ms; /* a layer used within this is never paged out for another */
    unsigned lanes;          /* concurrent device work per GPU (0 = 4) */
    uint64_t lane_scratch;   /* device scratch per lane, bytes (0 = 256 MiB) */
    uint64_t pin_min_bytes;  /* index arrays this large or more are pinned (0 = 1 MiB) */
} msa_gpu_config_t;

/* Opens every device, carves the arenas. MSA_EUNAVAIL (why says it) when no
 * device is usable; MSA_ENOMEM when the budgets do not fit. */
int msa_gpu_open(const msa_gpu_config_t *cfg, msa_gpu_t **out, char *why, size_t len);
/* The index must no longer call the accelerator (msa_idx_set_accel(x, NULL)). */
void msa_gpu_close(msa_gpu_t *g);
/* The accelerator to install into the index. */
void msa_gpu_accel(msa_gpu_t *g, msa_idx_accel_t *out);
/* The host allocator for the index's row arrays: pinned memory (arrays of
 * cfg.pin_min_bytes and more, up to half the host's memory), so that layers paged out of the
 * GPU stream back by DMA; malloc past that. The index must be destroyed
 * before g is closed. */
void msa_gpu_host_allocator(msa_gpu_t *g, msa_idx_host_alloc_t *out);

/* ---- Attend ------------------------------------------------------------------------ */

/* Host bytes of one block's K and V in the stored dtype, [nrows][H][D] each. */
typedef int (*msa_gpu_kv_loader_t)(void *arg, uint32_t i, const void **k, const void **v,
                                   uint32_t *nrows);

typedef struct msa_gpu_attend_args {
    uint32_t coll_id, layer;  /* cache key parts */
    const uint64_t *docs;     /* n documents */
    const uint64_t *versions; /* their version (commit seq that wrote them) */
    uint32_t n;
    msa_gpu_kv_loader_t load; /* called for cache misses, inside the caller's snapshot */
    void *load_arg;
    const float *q; /* host [T][Hq][D] */
    uint32_t T, Hq, H, D;
    float scale;
    msa_dtype_t kv_dtype;
    float *out; /* host [T][Hq][D] */
    float *lse; /* host [T][Hq] */
} msa_gpu_attend_args_t;

/* Attention over the documents' K/V, from the device cache where present.
 * MSA_EUNAVAIL when the device cannot take it (blocks do not fit the
 * scratch, or a device error, which also switches the backend off): the
 * caller then attends on the CPU. Loader errors are passed through. */
int msa_gpu_attend(msa_gpu_t *g, const msa_gpu_attend_args_t *a);
/* A collection was dropped: its cached blocks go. */
void msa_gpu_forget_coll(msa_gpu_t *g, uint32_t coll_id);

/* ---- stats ------------------------------------------------------------------------- */

typedef struct msa_gpu_device_stats {
    char name[128];
    uint64_t memory_total;  /* bytes */
    uint64_t memory_used;   /* by msad: arenas + scratch */
    uint64_t routing_bytes; /* keys resident */
    uint64_t cache_bytes;   /* K/V blocks cached */
} msa_gpu_device_stats_t;

typedef struct msa_gpu_stats {
    unsigned devices, shards;
    uint64_t routes_device;       /* layer routes answered by the device */
    uint64_t routes_streamed;     /* ... of them with keys streamed (not resident) */
    uint64_t routes_fallback;     /* layer routes handed back to the CPU */
    uint64_t batches;             /* device passes (a pass serves >= 1 coalesced query) */
    uint64_t coalesced;           /* queries that shared a pass with another */
    uint64_t page_ins, page_outs; /* (collection, layer) mirrors made resident / evicted */
    uint64_t syncs;               /* mirror updates (appends, deletes, rebuilds) */
    uint64_t cache_hits, cache_misses, cache_evictions;
    uint64_t attends_device, attends_fallback;
    bool disabled;         /* a device error switched the backend off */
    uint64_t pinned_bytes; /* host memory pinned for the index's row arrays */
} msa_gpu_stats_t;

void msa_gpu_get_stats(msa_gpu_t *g, msa_gpu_stats_t *out);
/* i < stats.devices. */
void msa_gpu_get_device_stats(msa_gpu_t *g, unsigned i, msa_gpu_device_stats_t *out);

#ifdef __cplusplus
}
#endif
#endif
