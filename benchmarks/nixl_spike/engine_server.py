"""One vLLM AsyncLLM engine (prefill, decode or aggregated) behind a tiny ZMQ control socket.

Research spike for disaggregated prefill with vLLM's NixlConnector on a CPU-only box; see NOTES.md.
The driver (spike.py) starts two of these (prefill + decode) and talks to them over loopback:

    python engine_server.py --role prefill --model DIR --ctl-port 5700 --side-port 5600
    python engine_server.py --role decode  --model DIR --ctl-port 5701 --side-port 5601

Control protocol: REQ -> ROUTER, one msgpack map per call, one reply per call:
  {"op": "generate", "rid", "prompt": [ids], "max_tokens", "kv_transfer_params": {..} | None, "timeout": s}
  {"op": "abort", "rid"}   {"op": "stats"}   {"op": "ping"}   {"op": "shutdown"}
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import traceback
from typing import Any


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--role", choices=["prefill", "decode", "agg"], required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--ctl-port", type=int, required=True)
    p.add_argument("--side-port", type=int, default=5600, help="VLLM_NIXL_SIDE_CHANNEL_PORT")
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--kv-mib", type=int, default=64)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--policy", choices=["fail", "recompute"], default="fail", help="kv_load_failure_policy")
    p.add_argument("--lease", type=int, default=30, help="kv_connector_extra_config.kv_lease_duration (s)")
    p.add_argument("--prefix-caching", action="store_true")
    p.add_argument("--connector", default="NixlConnector")
    p.add_argument(
        "--kv-role",
        choices=["auto", "kv_both"],
        default="auto",
        help="auto: kv_producer for prefill, kv_consumer for decode",
    )
    p.add_argument("--extra-config", default="{}", help="JSON merged into kv_connector_extra_config")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    # Must be in os.environ before AsyncLLM spawns EngineCore (which reads them).
    os.environ["VLLM_NIXL_SIDE_CHANNEL_HOST"] = "127.0.0.1"
    os.environ["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(args.side_port)
    # zdyn's vLLM general plugin (zdyn.engines.vllm:setup_vllm_process, loaded via its entry point in every vLLM
    # process) enables AMX and, with this set, makes EngineCore die with us (PR_SET_PDEATHSIG).
    os.environ["ZDYN_WORKER_PID"] = str(os.getpid())
    asyncio.run(serve(args))


def build_engine(args: argparse.Namespace, stats: dict[str, Any]) -> Any:
    from vllm.config import KVTransferConfig
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.metrics.loggers import StatLoggerBase

    class Recorder(StatLoggerBase):
        """Keeps what vLLM reports per step: prompt-token sources, NIXL telemetry, KV usage."""

        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            pass

        def record(self, scheduler_stats: Any, iteration_stats: Any, *a: Any, **kw: Any) -> None:
            if scheduler_stats is not None:
                stats["kv_usage"] = float(scheduler_stats.kv_cache_usage)
                stats["running"] = scheduler_stats.num_running_reqs
                stats["waiting"] = scheduler_stats.num_waiting_reqs
                if scheduler_stats.num_kv_fetch_reqs_by_stage:
                    stats["kv_fetch_stages"] = dict(scheduler_stats.num_kv_fetch_reqs_by_stage)
                kvc = scheduler_stats.kv_connector_stats
                if kvc:
                    for key, vals in (kvc.get("NixlConnector", kvc) if isinstance(kvc, dict) else {}).items():
                        if isinstance(vals, list):
                            stats["nixl"].setdefault(key, []).extend(vals)
            if iteration_stats is not None:
                pts = iteration_stats.prompt_token_stats
                if pts.total:
                    for k in ("computed", "local_cache_hit", "external_kv_transfer", "total"):
                        stats["prompt_tokens"][k] += getattr(pts, k)

        def log_engine_initialized(self) -> None:
            pass

    kv_transfer_config = None
    if args.role != "agg":
        kv_transfer_config = KVTransferConfig(
            kv_connector=args.connector,
            # kv_both is deprecated-with-warning for Nixl; producer/consumer roles work the same for pull mode.
            kv_role=args.kv_role
            if args.kv_role != "auto"
            else ("kv_producer" if args.role == "prefill" else "kv_consumer"),
            kv_buffer_device="cpu",
            kv_load_failure_policy=args.policy,
            kv_connector_extra_config={
                "backends": ["UCX"],
                "kv_lease_duration": args.lease,
                **json.loads(args.extra_config),
            },
        )
    engine_args = AsyncEngineArgs(
        model=args.model,
        dtype=args.dtype,
        enforce_eager=True,
        max_model_len=args.max_model_len,
        max_num_seqs=16,
        block_size=args.block_size,
        kv_cache_memory_bytes=args.kv_mib * 2**20,
        enable_prefix_caching=args.prefix_caching,
        seed=0,
        kv_transfer_config=kv_transfer_config,
    )
    return AsyncLLM.from_engine_args(engine_args, stat_loggers=[Recorder])


async def serve(args: argparse.Namespace) -> None:
    import msgpack
    import zmq
    import zmq.asyncio
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    stats: dict[str, Any] = {
        "prompt_tokens": {"computed": 0, "local_cache_hit": 0, "external_kv_transfer": 0, "total": 0},
        "nixl": {},
        "kv_usage": 0.0,
    }
    t0 = time.perf_counter()
    llm = build_engine(args, stats)
    init_s = time.perf_counter() - t0
    cfg = llm.vllm_config
    num_blocks = cfg.cache_config.num_gpu_blocks
    print(f"[{args.role}] engine ready in {init_s:.1f}s, blocks={num_blocks}", flush=True)

    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind(f"tcp://127.0.0.1:{args.ctl_port}")
    stop = asyncio.Event()
    tasks: set[asyncio.Task] = set()

    async def reply(ident: bytes, obj: dict[str, Any]) -> None:
        await sock.send_multipart([ident, b"", msgpack.packb(obj, default=str)])

    async def generate(ident: bytes, msg: dict[str, Any]) -> None:
        params = SamplingParams(
            temperature=0.0,
            max_tokens=msg.get("max_tokens", 16),
            ignore_eos=True,
            detokenize=False,
            output_kind=RequestOutputKind.DELTA,
            extra_args={"kv_transfer_params": msg["kv_transfer_params"]} if msg.get("kv_transfer_params") else None,
        )
        result: dict[str, Any] = {"ok": True, "token_ids": [], "rid": msg["rid"]}
        start = time.perf_counter()
        try:
            async for out in llm.generate({"prompt_token_ids": msg["prompt"]}, params, msg["rid"]):
                now = time.perf_counter()
                c = out.outputs[0]
                if "ttft" not in result:
                    result["ttft"] = now - start
                    result["num_cached_tokens"] = out.num_cached_tokens
                result["token_ids"].extend(c.token_ids)
                if out.finished:
                    result["finish_reason"] = c.finish_reason
                    result["stop_reason"] = c.stop_reason
                    result["kv_transfer_params"] = out.kv_transfer_params
                    result["num_cached_tokens_final"] = out.num_cached_tokens
        except asyncio.CancelledError:
            result.update(ok=False, error="cancelled")
        except Exception as e:
            result.update(ok=False, error=f"{type(e).__name__}: {e}", tb=traceback.format_exc()[-2000:])
        result["e2e"] = time.perf_counter() - start
        await reply(ident, result)

    async def handle(ident: bytes, msg: dict[str, Any]) -> None:
        op = msg["op"]
        if op == "generate":
            await generate(ident, msg)
        elif op == "abort":
            await llm.abort(msg["rid"])
            await reply(ident, {"ok": True})
        elif op == "reject":  # decode side refuses a prefilled request: free the P blocks now
            await llm.notify_kv_transfer_request_rejected(msg["rid"], msg["kv_transfer_params"])
            await reply(ident, {"ok": True})
        elif op == "stats":
            await reply(ident, {"ok": True, "num_blocks": num_blocks, "init_s": init_s, **stats})
            if msg.get("reset"):
                stats["nixl"] = {}
                stats["prompt_tokens"] = dict.fromkeys(stats["prompt_tokens"], 0)
        elif op == "ping":
            await reply(ident, {"ok": True, "role": args.role, "num_blocks": num_blocks})
        elif op == "shutdown":
            await reply(ident, {"ok": True})
            stop.set()

    async def loop() -> None:
        while True:
            ident, _, payload = await sock.recv_multipart()
            t = asyncio.create_task(handle(ident, msgpack.unpackb(payload)))
            tasks.add(t)
            t.add_done_callback(tasks.discard)

    server = asyncio.create_task(loop())
    await stop.wait()
    server.cancel()
    await asyncio.sleep(0.05)
    llm.shutdown()
    sock.close(0)
    ctx.term()
    print(f"[{args.role}] shut down", flush=True)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
