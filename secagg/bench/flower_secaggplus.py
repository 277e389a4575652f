"""Flower 1.41 SecAgg+ driven in-process, no transport: the client stage functions of
flwr.client.mod.secure_aggregation.secaggplus_mod and the server logic of
flwr.server.workflow.secure_aggregation.secaggplus_workflow (its share forwarding,
masked-vector summation and unmask_stage body, restated here because the workflow
method needs a Grid). Usage: flower_secaggplus.py N D K DROP_PERCENT
Prints: RESULT flower N D K DROP client_median_s server_s peak_rss_mib
"""

import importlib
import random
import resource
import statistics
import sys
import time

import numpy as np
from flwr.common import ndarrays_to_parameters, ndarray_to_bytes, bytes_to_ndarray
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.common.secure_aggregation.ndarrays_arithmetic import (
    factor_extract, get_parameters_shape, parameters_addition, parameters_mod,
    parameters_subtraction,
)
from flwr.common.secure_aggregation.quantization import dequantize
from flwr.common.secure_aggregation.secaggplus_constants import Key
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

# The package re-exports the mod function under the module's name; take the module.
mod = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")


def main(n, d, k, drop_percent):
    threshold = 2 * k // 3 + 1
    clipping_range, quantization_range, mod_range, max_weight = 8.0, 1 << 22, 1 << 32, 1000.0
    random.seed(42)
    rng = np.random.default_rng(n * 1000003 + d)
    nids = list(range(1, n + 1))
    client_time = {nid: 0.0 for nid in nids}
    server_time = 0.0

    def timed_client(nid, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        client_time[nid] += time.perf_counter() - start
        return out

    # Stage 0: setup (as SecAggPlusWorkflow.setup_stage with num_shares=k).
    start = time.perf_counter()
    shuffled = list(nids)
    random.shuffle(shuffled)
    half = k >> 1
    neighbours = {
        nid: {shuffled[(idx + off) % n] for off in range(-half, half + 1)}
        for idx, nid in enumerate(shuffled)
    }
    setup_cfg = {
        Key.SAMPLE_NUMBER: n, Key.SHARE_NUMBER: k, Key.THRESHOLD: threshold,
        Key.CLIPPING_RANGE: clipping_range, Key.TARGET_RANGE: quantization_range,
        Key.MOD_RANGE: mod_range, Key.MAX_WEIGHT: max_weight,
    }
    server_time += time.perf_counter() - start
    states, public_keys = {}, {}
    for nid in nids:
        state = mod.SecAggPlusState()
        state.nid = nid
        states[nid] = state
        res = timed_client(nid, mod._setup, state, setup_cfg)
        public_keys[nid] = [res[Key.PUBLIC_KEY_1], res[Key.PUBLIC_KEY_2]]

    # Stage 1: share keys; the server forwards ciphertexts by destination.
    fwd_ct = {nid: [] for nid in nids}
    fwd_src = {nid: [] for nid in nids}
    for nid in nids:
        start = time.perf_counter()
        cfg = {str(other): public_keys[other] for other in neighbours[nid]}
        server_time += time.perf_counter() - start
        res = timed_client(nid, mod._share_keys, states[nid], cfg)
        start = time.perf_counter()
        for dst, ct in zip(res[Key.DESTINATION_LIST], res[Key.CIPHERTEXT_LIST]):
            fwd_ct[dst].append(ct)
            fwd_src[dst].append(nid)
        server_time += time.perf_counter() - start

    # Stage 2: masked vectors; DROP% of clients, drawn at random, vanish before sending.
    dropped = set(random.sample(nids, n * drop_percent // 100))
    active = [nid for nid in nids if nid not in dropped]
    masked_vector = None
    for nid in active:
        params = ndarrays_to_parameters([rng.uniform(-1, 1, d).astype(np.float32)])
        cfg = {Key.CIPHERTEXT_LIST: fwd_ct[nid], Key.SOURCE_LIST: fwd_src[nid]}
        res = timed_client(nid, mod._collect_masked_vectors, states[nid], cfg, int(max_weight), params)
        start = time.perf_counter()
        vec = [bytes_to_ndarray(b) for b in res[Key.MASKED_PARAMETERS]]
        masked_vector = vec if masked_vector is None else parameters_addition(masked_vector, vec)
        server_time += time.perf_counter() - start
    start = time.perf_counter()
    masked_vector = parameters_mod(masked_vector, mod_range)
    server_time += time.perf_counter() - start

    # Stage 3: unmask (the body of SecAggPlusWorkflow.unmask_stage).
    active_nids, dead_nids = set(active), dropped
    collected = {nid: [] for nid in nids}
    for nid in active:
        cfg = {
            Key.ACTIVE_NODE_ID_LIST: list(neighbours[nid] & active_nids),
            Key.DEAD_NODE_ID_LIST: list(neighbours[nid] & dead_nids),
        }
        res = timed_client(nid, mod._unmask, states[nid], cfg)
        start = time.perf_counter()
        for owner, share in zip(res[Key.NODE_ID_LIST], res[Key.SHARE_LIST]):
            collected[owner].append(share)
        server_time += time.perf_counter() - start
    start = time.perf_counter()
    for nid, share_list in collected.items():
        assert len(share_list) >= threshold, "not enough shares"
        secret = combine_shares(share_list)
        if nid in active_nids:
            mask = pseudo_rand_gen(secret, mod_range, get_parameters_shape(masked_vector))
            masked_vector = parameters_subtraction(masked_vector, mask)
        else:
            nbrs = set(neighbours[nid])
            nbrs.remove(nid)
            for other in nbrs:
                shared_key = generate_shared_key(
                    bytes_to_private_key(secret), bytes_to_public_key(public_keys[other][0]))
                mask = pseudo_rand_gen(shared_key, mod_range, get_parameters_shape(masked_vector))
                if nid > other:
                    masked_vector = parameters_addition(masked_vector, mask)
                else:
                    masked_vector = parameters_subtraction(masked_vector, mask)
    recon = parameters_mod(masked_vector, mod_range)
    q_total_ratio, recon = factor_extract(recon)
    inv_dq_total_ratio = quantization_range / q_total_ratio
    aggregated = dequantize(recon, clipping_range, quantization_range)
    offset = -(len(active_nids) - 1) * clipping_range
    for vec in aggregated:
        vec += offset
        vec *= inv_dq_total_ratio
    server_time += time.perf_counter() - start
    # Sanity: weights were max_weight each, so the result is the mean of inputs in [-1, 1].
    assert np.all(np.abs(aggregated[0]) <= 1.0 + 1e-3), "aggregate out of range"

    client_median = statistics.median(client_time[nid] for nid in active)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(f"RESULT flower {n} {d} {k} {drop_percent} {client_median:.6f} {server_time:.6f} {peak_mib:.1f}")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:5]))
