/* engine_impl.h — what the engine's files share (not a public header: only
 * daemon/engine*.c include it). The engine object, the write queue item, the
 * read snapshot, and the msa__engine_* helpers each file exports to the
 * others. The public contract is engine.h.
 */
#ifndef MSA_ENGINE_IMPL_H
#define MSA_ENGINE_IMPL_H

#include "engine.h"

/* The one result shape of engine.h: every result is one zeroed allocation the
 * caller frees with the call's _result_free. NULL (st set) when out of memory. */
void *msa__engine_result_new(size_t size, msa_status_t *st);

#endif
