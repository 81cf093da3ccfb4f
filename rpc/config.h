/* config.h — msad's options: command-line flags and a config file with the
 * same keys (`key = value` lines, # comments; flags win over the file; a
 * repeatable key such as listen may appear several times).
 *
 * Parsing is pure apart from reading the config file and the MSA_GPU_*
 * variables of the environment (the simulated test device and the device
 * layer's debugging knobs: gpu_dev); no globals. The result owns its strings:
 * free with msa_rpc_opts_free.
 */
#ifndef MSA_RPC_CONFIG_H
#define MSA_RPC_CONFIG_H

#include "engine.h"
#include "msa_err.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>

#ifdef __cplusplus
extern "C" {
#endif

#define MSA_RPC_DEFAULT_LISTEN "127.0.0.1:7420"
#define MSA_RPC_DEFAULT_DATA "./msa-data"

typedef enum { MSA_RPC_RUN = 0, MSA_RPC_HELP = 1, MSA_RPC_VERSION = 2 } msa_rpc_action_t;

typedef struct msa_rpc_opts {
    msa_rpc_action_t action;
    char *config;   /* --config F */
    char *data_dir; /* --data DIR */
    char **listen;  /* --listen ADDR (repeatable) */
    size_t n_listen;
    msa_engine_backend_t backend; /* --backend auto|cpu|cuda */
    unsigned threads;             /* --threads N: pollers and engine compute threads (0 = cores) */
    unsigned handlers;            /* --handlers N: handler threads (0 = max(16, 4 * threads)) */
    unsigned max_queue;           /* --max-queue N: calls waiting for a handler (0 = 4096) */
    unsigned max_queue_mb;        /* --max-queue-mb N: their request bytes, MiB (0 = 1024) */
    unsigned max_connections;     /* --max-connections N (0 = 1024, clamped to the fd limit) */
    unsigned idle_timeout_s;      /* --idle-timeout S: idle connections closed (0 = 300) */
    unsigned handshake_timeout_s; /* --handshake-timeout S: setup must finish (0 = 10) */
    unsigned max_min_seq_waiters; /* --max-min-seq-waiters N (0 = engine default, 8) */
    char *tokens_file;            /* --tokens-file F */
    char *tls_cert, *tls_key;     /* --tls-cert F --tls-key F */
    char *tls_client_ca;          /* --tls-client-ca F */
    char *backup_dir;             /* --backup-dir DIR */
    unsigned max_message_mb;      /* --max-message-mb N (1..2047, default 256) */
    /* Request limits; 0 = the engine's default (see msa_engine_config_t). */
    unsigned max_query_tokens;     /* --max-query-tokens N (65536) */
    unsigned max_write_ops;        /* --max-write-ops N (4096) */
    unsigned max_text_bytes;       /* --max-text-bytes N (16 MiB) */
    unsigned max_metadata_bytes;   /* --max-metadata-bytes N (1 MiB) */
    unsigned max_ids;              /* --max-ids N (100000) */
    unsigned max_held_snapshots;   /* --max-held-snapshots N (256) */
    unsigned max_snapshot_hold_ms; /* --max-snapshot-hold-ms N (60000) */
    bool nosync;                   /* --sync full|nosync */
    unsigned map_max_gb;           /* --map-max-gb N (0 = engine default) */
    unsigned map_mb;               /* --map-mb N: initial LMDB map in MiB (0 = engine default) */
    unsigned map_max_mb;           /* --map-max-mb N: map limit in MiB (wins over --map-max-gb) */
    unsigned max_readers;          /* --max-readers N: LMDB reader slots (0 = engine default) */
    msa_store_check_t check_on_start;        /* --check-on-start full|quick|off (full) */
    unsigned gpu_shards;                     /* --gpu-shards N (1) */
    unsigned gpu_routing_gb, gpu_routing_mb; /* routing-key budget per GPU (0 = default) */
    unsigned gpu_cache_gb, gpu_cache_mb;     /* K/V cache per GPU (UINT_MAX = default) */
    unsigned gpu_coalesce_us;                /* --gpu-coalesce-us (100) */
    unsigned gpu_evict_grace_ms;             /* --gpu-evict-grace-ms (1000) */
    unsigned gpu_lanes;                      /* --gpu-lanes (0 = 4) */
    unsigned gpu_scratch_mb;                 /* --gpu-scratch-mb (0 = 256) */
    msa_dev_config_t gpu_dev;  /* MSA_GPU_SIM=1 etc. in the environment (msa_dev_config_env) */
    unsigned shutdown_grace_s; /* --shutdown-grace S: then in-flight calls are cancelled (30) */
    char *metrics;             /* --metrics ADDR */
    char *log_level;           /* --log-level debug|info|warn|error */
    bool log_json;             /* --log-format text|json */
} msa_rpc_opts_t;

/* Parses argv (and the --config file it names). On MSA_EINVAL st holds a
 * message for the user (exit 2); MSA_EIO when the config file cannot be read.
 * *o is filled with defaults first and must be freed in every case. */
int msa_rpc_opts_parse(int argc, char **argv, msa_rpc_opts_t *o, msa_status_t *st);
void msa_rpc_opts_free(msa_rpc_opts_t *o);
/* Prints the --help text. */
void msa_rpc_opts_usage(FILE *f);

#ifdef __cplusplus
}
#endif
#endif
