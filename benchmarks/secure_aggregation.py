"""Secure aggregation cost per round for each bundle's network: time and bytes with and without encryption.

For each of the four bundles' networks (the bundle's own ``network_def``) and ``--sites`` sites, one round of the
secure-aggregation pipeline on this machine, with NVFlare's own HE components where they do the work:

* plain: each site's update (float32 state dict) as sent without encryption; the server sums the n updates;
* site: clip + noise share (:class:`monai_dp.fl.secure.DistributedNoise`), then NVFlare's ``HEModelEncryptor``
  (one CKKS vector per tensor, as in a job) and serialisation: the bytes that go up;
* server: deserialisation with the server's context (no secret key), ciphertexts added and scaled by 1/n (what
  NVFlare's ``HEInTimeAccumulateWeightedAggregator`` does), serialisation: the bytes that go down;
* site: NVFlare's ``HEModelDecryptor`` on the aggregate, and its largest error against the exact mean.

It measures and writes a markdown table; it asserts nothing. Example::

    python benchmarks/secure_aggregation.py --sites 3 --output secure_aggregation.md
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLES = ["dp_classification_2d", "dp_classification_3d", "dp_segmentation_2d", "dp_segmentation_3d"]


def _contexts() -> tuple:
    import tenseal as ts
    from nvflare.lighter.impl.he import HEBuilder

    builder = HEBuilder()  # NVFlare's provisioning defaults: N = 8192, [60, 40, 40], scale 2^40
    builder.initialize(None, None)
    return (ts.context_from(builder.get_serialized_context(is_client=True)),
            ts.context_from(builder.get_serialized_context(is_client=False)))


def _updates(state: dict, sites: int, seed: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    return [{k: 1e-3 * torch.randn(v.shape, generator=gen) for k, v in state.items()} for _ in range(sites)]


def one_round(bundle: str, sites: int, clip: float, sigma: float) -> dict:
    import tenseal as ts
    from nvflare.apis.fl_context import FLContext
    from nvflare.app_opt.he.homomorphic_encrypt import serialize_nested_dict
    from nvflare.app_opt.he.model_decryptor import HEModelDecryptor
    from nvflare.app_opt.he.model_encryptor import HEModelEncryptor

    from monai_dp.fl.job import BundleNetwork
    from monai_dp.fl.secure import DistributedNoise

    state = {k: v.float() for k, v in BundleNetwork(os.path.join(REPO, "bundles", bundle)).state_dict().items()}
    n_params = sum(v.numel() for v in state.values())
    client_ctx, server_ctx = _contexts()
    fl_ctx = FLContext()
    encryptor = HEModelEncryptor(weigh_by_local_iter=False)
    encryptor.tenseal_context, encryptor.encrypt_layers = client_ctx, [True]
    decryptor = HEModelDecryptor()
    decryptor.tenseal_context = client_ctx
    row = {"bundle": bundle, "network": type(BundleNetwork(os.path.join(REPO, "bundles", bundle)).net).__name__,
           "tensors": len(state), "params": n_params}

    updates = _updates(state, sites, seed=0)
    plain = [{k: v.numpy() for k, v in u.items()} for u in updates]
    row["plain_bytes_per_site"] = sum(a.nbytes for a in plain[0].values())
    start = time.perf_counter()
    exact = {k: sum(p[k] for p in plain) for k in plain[0]}
    row["plain_aggregate_s"] = time.perf_counter() - start

    total, noised_sum, encrypt_s, up_bytes = None, None, [], 0
    for i, update in enumerate(updates):
        start = time.perf_counter()
        noised, _ = DistributedNoise(sites, clip, sigma, noise_seed=i).privatize(update)
        params = {k: v.numpy() for k, v in noised.items()}
        noised_sum = params if noised_sum is None else {k: noised_sum[k] + params[k] for k in params}
        encrypted, _ = encryptor.encryption(dict(params), fl_ctx)
        blobs = serialize_nested_dict(encrypted)  # CKKS vectors -> bytes, as sent
        encrypt_s.append(time.perf_counter() - start)
        up_bytes = sum(len(b) for b in blobs.values())
        start = time.perf_counter()  # server: deserialise with its own context and add
        received = {k: ts.ckks_vector_from(server_ctx, b) for k, b in blobs.items()}
        total = received if total is None else {k: total[k] + received[k] for k in received}
        encrypt_s[-1] = (encrypt_s[-1], time.perf_counter() - start)
        del blobs, received, encrypted
    start = time.perf_counter()
    aggregate = {k: v * (1.0 / sites) for k, v in total.items()}
    down = serialize_nested_dict(aggregate)
    server_s = time.perf_counter() - start + sum(s for _, s in encrypt_s)
    row["cipher_bytes_per_site"], row["cipher_bytes_down"] = up_bytes, sum(len(b) for b in down.values())
    start = time.perf_counter()
    decrypted = decryptor.decryption(dict(down), {k: True for k in down}, fl_ctx)
    row["decrypt_s"] = time.perf_counter() - start
    row["site_clip_noise_encrypt_s"] = float(np.mean([e for e, _ in encrypt_s]))
    row["server_aggregate_s"] = server_s
    error = max(float(np.abs(np.asarray(decrypted[k]) * sites - noised_sum[k].ravel()).max()) for k in decrypted)
    row["max_abs_error_of_sum"] = error
    del exact
    return row


def table(rows: list[dict], sites: int) -> str:
    head = ("| network (bundle) | params | tensors | plain up / site | encrypted up / site | encrypted down | "
            f"expansion | plain sum of {sites} (s) | site: clip+noise+encrypt (s) | server: add {sites} ciphertexts "
            "(s) | site: decrypt (s) | max error of the sum |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        lines.append(
            f"| {r['network']} ({r['bundle']}) | {r['params']:,} | {r['tensors']} "
            f"| {r['plain_bytes_per_site'] / 1e6:.2f} MB "
            f"| {r['cipher_bytes_per_site'] / 1e6:.1f} MB | {r['cipher_bytes_down'] / 1e6:.1f} MB "
            f"| {r['cipher_bytes_per_site'] / r['plain_bytes_per_site']:.0f}x | {r['plain_aggregate_s']:.3f} "
            f"| {r['site_clip_noise_encrypt_s']:.1f} | {r['server_aggregate_s']:.1f} | {r['decrypt_s']:.1f} "
            f"| {r['max_abs_error_of_sum']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--bundles", nargs="+", default=BUNDLES)
    parser.add_argument("--clip_norm", type=float, default=0.1)
    parser.add_argument("--noise_multiplier", type=float, default=1.0)
    parser.add_argument("--output", default=None, help="markdown file for the table (default: print only)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for bundle in args.bundles:
        rows.append(one_round(bundle, args.sites, args.clip_norm, args.noise_multiplier))
        print(rows[-1], flush=True)
    out = table(rows, args.sites)
    print(out)
    if args.output:
        with open(args.output, "w") as f:
            f.write(out)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    sys.exit(main())
