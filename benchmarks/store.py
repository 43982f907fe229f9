"""`make bench-store`: the adapter store's data path on the CPU, in one run.

    python3 -m benchmarks.store [--repeats 3] [--rank 48] [--out DIR]

A 64 MiB adapter (Llama-3.2-1B shapes, rank 48, bf16, all seven projections) sits in a moto S3 server
(its own process, over real HTTP on loopback). Compared, interleaved, median of --repeats:
  - boto3 alone: download_file of the adapter's two objects (the transfer manager, the store's settings);
  - cold fetch: the worker's StoreClient.download of a name the store has never seen: Resolve (the store
    downloads from S3 with boto3, validates, hashes, commits to its cache), then Fetch of every file to
    the client (chunk and file sha256 checked, written to disk). Target: >= 70% of boto3 alone;
  - warm fetch: the same with the adapter in the store's cache (target >= 1 GB/s over loopback), and the
    bare Fetch stream (received, not checked or written) to separate gRPC from the client's own work.
The store runs as `python -m adapter_store` in its own process, as in production.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

from benchmarks.synthetic import LLAMA_3_2_1B, write_adapter
from gpu_worker.store_client import StoreClient
from loraserve.v1 import adapter_store_pb2, adapter_store_pb2_grpc, common_pb2

AWS_ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}
MOTO = ("from moto.server import ThreadedMotoServer; import time; s = ThreadedMotoServer(ip_address='127.0.0.1', "
        "port=0, verbose=False); s.start(); print(s.get_host_and_port()[1], flush=True); time.sleep(1e9)")
FILES = ("adapter_config.json", "adapter_model.safetensors")


def start(cmd: list[str], env: dict, ready: str = "") -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline().strip()
    if not line or (ready and ready not in line):
        proc.kill()
        raise RuntimeError(f"{cmd[:3]} did not start: {line!r}")
    return proc, line


def boto3_alone(s3, bucket: str, prefix: str, dest: Path) -> float:
    from boto3.s3.transfer import TransferConfig

    # the store's defaults: 8 MiB ranged GETs, 10 at a time (adapter_store/sources/s3.py S3Settings)
    config = TransferConfig(multipart_threshold=8 << 20, multipart_chunksize=8 << 20, max_concurrency=10)
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    t = time.perf_counter()
    for f in FILES:
        s3.download_file(bucket, prefix + f, str(dest / f), Config=config)
    return time.perf_counter() - t


def store_fetch(address: str, name: str, dest: Path) -> tuple[float, float]:
    """(seconds for the whole download, seconds of it the Resolve took)."""
    shutil.rmtree(dest, ignore_errors=True)
    with StoreClient(address) as client:
        resolve, spent = client.resolve, []

        def timed(n):  # the Resolve the download makes first: the store's side of a cold fetch
            t0 = time.perf_counter()
            try:
                return resolve(n)
            finally:
                spent.append(time.perf_counter() - t0)

        client.resolve = timed
        t = time.perf_counter()
        local = client.download(name, dest)
        dt = time.perf_counter() - t
    assert local.fetched
    return dt, spent[0]


def bare_stream(address: str, name: str) -> float:
    with grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 8 << 20)]) as ch:
        stub = adapter_store_pb2_grpc.AdapterStoreServiceStub(ch)
        m = stub.ResolveAdapter(adapter_store_pb2.ResolveAdapterRequest(name=name)).manifest
        t = time.perf_counter()
        for f in m.files:
            ref = common_pb2.AdapterRef(name=name, content_hash=m.ref.content_hash)
            req = adapter_store_pb2.FetchAdapterRequest(ref=ref, path=f.path)
            for _ in stub.FetchAdapter(req):
                pass
        return time.perf_counter() - t


def forget(address: str, name: str, token: str) -> None:
    with grpc.insecure_channel(address) as ch:
        adapter_store_pb2_grpc.AdapterStoreServiceStub(ch).DeleteAdapter(
            adapter_store_pb2.DeleteAdapterRequest(name=name), metadata=(("authorization", f"Bearer {token}"),))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rank", type=int, default=48, help="48: 64.5 MiB at Llama-3.2-1B shapes")
    ap.add_argument("--out", help="write results.json here")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench-store-"))
    env = {**os.environ, **AWS_ENV, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    os.environ.update(AWS_ENV)
    procs = []
    try:
        adapter = write_adapter(work / "adapter", LLAMA_3_2_1B, rank=args.rank, seed=0)
        size = sum((adapter / f).stat().st_size for f in FILES)
        moto, port = start([sys.executable, "-c", MOTO], env)
        procs.append(moto)
        endpoint = f"http://127.0.0.1:{port}"
        import boto3

        s3 = boto3.client("s3", endpoint_url=endpoint)
        s3.create_bucket(Bucket="bench")
        for f in FILES:
            s3.upload_file(str(adapter / f), "bench", f"adapters/bench-lora/{f}")

        token = secrets.token_hex(8)
        store, line = start([sys.executable, "-m", "adapter_store", "--host", "127.0.0.1", "--port", "0",
                             "--cache-dir", str(work / "store-cache"), "--s3-endpoint-url", endpoint,
                             "--s3-bucket", "bench", "--s3-prefix", "adapters/", "--enable-admin",
                             "--log-level", "warning"], {**env, "LORASERVE_ADMIN_TOKEN": token},
                            ready="adapter-store serving on")
        procs.append(store)
        address = line.rsplit(" ", 1)[1]

        boto3_alone(s3, "bench", "adapters/bench-lora/", work / "warmup")  # connections, imports
        base, cold, resolve, warm, bare = [], [], [], [], []
        for _ in range(args.repeats):
            base.append(boto3_alone(s3, "bench", "adapters/bench-lora/", work / "boto3"))
            if cold:
                forget(address, "bench-lora", token)  # cold again: the store forgets it
            total, resolved = store_fetch(address, "bench-lora", work / "worker-cold")
            cold.append(total)
            resolve.append(resolved)
        for _ in range(args.repeats):
            warm.append(store_fetch(address, "bench-lora", work / "worker-warm")[0])
            bare.append(bare_stream(address, "bench-lora"))

        runs = dict(boto3=base, cold=cold, resolve=resolve, warm=warm, bare=bare)
        med = {k: statistics.median(v) for k, v in runs.items()}
        rows = [
            ("boto3 alone (S3 -> disk)", med["boto3"], ""),
            ("cold: store S3 -> cache -> client", med["cold"], f"{100 * med['boto3'] / med['cold']:.0f}% of boto3"),
            ("  of which Resolve (S3 -> validated cache entry)", med["resolve"], ""),
            ("warm: store cache -> client (verified, on disk)", med["warm"], ""),
            ("warm: bare Fetch stream (no checks, no disk)", med["bare"], ""),
        ]
        print(f"\nadapter: {size / 2**20:.1f} MiB (rank {args.rank}, Llama-3.2-1B shapes); median of {args.repeats}; "
              f"{os.cpu_count()} CPUs")
        print(f"| {'path':<48} | {'seconds':>7} | {'GB/s':>5} | {'':<15} |")
        print(f"|{'-' * 50}|{'-' * 9}|{'-' * 7}|{'-' * 17}|")
        for label, secs, note in rows:
            print(f"| {label:<48} | {secs:7.3f} | {size / secs / 1e9:5.2f} | {note:<15} |")
        result = {"bytes": size, "repeats": args.repeats, "seconds": runs,
                  "cold_vs_boto3": med["boto3"] / med["cold"], "warm_gb_s": size / med["warm"] / 1e9,
                  "bare_gb_s": size / med["bare"] / 1e9, "cpus": os.cpu_count()}
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "store.json").write_text(json.dumps(result, indent=1))
        print(json.dumps({k: round(v, 3) for k, v in result.items() if isinstance(v, float)}))
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
