"""Disaggregated prefill with vLLM's NixlConnector on CPU: two AsyncLLM engines in two processes on loopback.

Run under the shared benchmark lock (see NOTES.md for results and the configuration that works):

    flock /tmp/zdyn-bench.lock python benchmarks/nixl_spike/spike.py basic
    flock /tmp/zdyn-bench.lock python benchmarks/nixl_spike/spike.py sizes [--model DIR]
    flock /tmp/zdyn-bench.lock python benchmarks/nixl_spike/spike.py failures
    flock /tmp/zdyn-bench.lock python benchmarks/nixl_spike/spike.py aborts

Each scenario starts its own engine processes (engine_server.py, own process group) and kills them on exit.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgpack
import zmq

HERE = Path(__file__).resolve().parent
TINY = str(Path.home() / ".cache/zdyn/models/tiny-llama")
LOG_DIR = Path(os.environ.get("NIXL_SPIKE_LOGS", "/tmp/nixl_spike_logs"))
_port = 5700


class Engine:
    """One engine_server.py process (own session, so its EngineCore children die with a killpg)."""

    def __init__(self, role: str, model: str, *extra: str, side_port: int | None = None, name: str | None = None):
        global _port
        _port += 1
        self.role = role
        self.name = name or role
        self.ctl_port = _port
        self.side_port = side_port
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        self.log_path = LOG_DIR / f"{self.name}.log"
        cmd = [
            sys.executable,
            str(HERE / "engine_server.py"),
            "--role",
            role,
            "--model",
            model,
            "--ctl-port",
            str(self.ctl_port),
            *extra,
        ]
        if side_port is not None:
            cmd += ["--side-port", str(side_port)]
        env = dict(os.environ, VLLM_LOGGING_LEVEL=os.environ.get("VLLM_LOGGING_LEVEL", "INFO"))
        self.log = open(self.log_path, "w")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.started = time.perf_counter()

    def wait_ready(self, timeout: float = 180) -> dict[str, Any]:
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited rc={self.proc.returncode}; see {self.log_path}")
            try:
                r = self.call({"op": "ping"}, timeout=1.0)
                r["ready_s"] = time.perf_counter() - self.started
                return r
            except TimeoutError:
                pass
        raise TimeoutError(f"{self.name} not ready after {timeout}s; see {self.log_path}")

    def call(self, msg: dict[str, Any], timeout: float = 120.0) -> dict[str, Any]:
        ctx = zmq.Context.instance()
        s = ctx.socket(zmq.REQ)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(f"tcp://127.0.0.1:{self.ctl_port}")
        try:
            s.send(msgpack.packb(msg))
            if not s.poll(int(timeout * 1000)):
                raise TimeoutError(f"{self.name}: no reply to {msg.get('op')} within {timeout}s")
            return msgpack.unpackb(s.recv())
        finally:
            s.close(0)

    def generate(
        self,
        prompt: list[int],
        max_tokens: int,
        params: dict | None = None,
        rid: str | None = None,
        timeout: float = 120.0,
    ) -> dict[str, Any]:
        rid = rid or f"{self.name}-{uuid.uuid4().hex[:12]}"
        msg = {"op": "generate", "rid": rid, "prompt": prompt, "max_tokens": max_tokens, "kv_transfer_params": params}
        t = time.perf_counter()
        r = self.call(msg, timeout=timeout)
        r["client_s"] = time.perf_counter() - t
        return r

    def stats(self, reset: bool = False) -> dict[str, Any]:
        return self.call({"op": "stats", "reset": reset}, timeout=10)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        # EngineCore children share the process group; make sure none survive the parent.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.log.close()

    def stop(self) -> None:
        try:
            self.call({"op": "shutdown"}, timeout=5)
            self.proc.wait(timeout=20)
        except Exception:
            pass
        self.kill()


def prompt_of(n: int, seed: int, vocab: int = 4096) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, vocab) for _ in range(n)]


def start(*engines: Engine) -> None:
    for e in engines:
        r = e.wait_ready()
        print(f"  {e.name}: ready in {r['ready_s']:.1f}s, {r['num_blocks']} KV blocks", flush=True)


def pd(prefill: Engine, decode: Engine, prompt: list[int], max_tokens: int, rid: str | None = None) -> dict[str, Any]:
    """The proxy's job: prefill leg with max_tokens=1 + do_remote_decode, then decode leg with the returned params."""
    rid = rid or uuid.uuid4().hex[:12]
    t = time.perf_counter()
    p = prefill.generate(prompt, 1, {"do_remote_decode": True}, rid=f"p-{rid}")
    t_p = time.perf_counter() - t
    if not p["ok"] or not p.get("kv_transfer_params"):
        return {"ok": False, "prefill": p}
    d = decode.generate(prompt, max_tokens, p["kv_transfer_params"], rid=f"d-{rid}")
    return {
        "ok": d["ok"],
        "prefill": p,
        "decode": d,
        "prefill_s": t_p,
        "ttft_total": t_p + d.get("ttft", float("nan")),
        "e2e": time.perf_counter() - t,
    }


def nixl_summary(st: dict[str, Any]) -> dict[str, Any]:
    n = st.get("nixl", {})
    dur = n.get("transfer_duration", [])
    b = n.get("bytes_transferred", [])
    out = {k: len(v) for k, v in n.items() if k.startswith("num_") and v}
    if dur:
        out.update(
            transfers=len(dur),
            xfer_ms_mean=1e3 * statistics.mean(dur),
            mb_mean=statistics.mean(b) / 2**20,
            post_ms_mean=1e3 * statistics.mean(n.get("post_duration", [0])),
        )
    return out


# ---------------------------------------------------------------------------------------------------------------- basic
def scenario_basic(args: argparse.Namespace) -> None:
    """(a) output equality vs aggregated engine, (b) the decode side does not recompute the prompt."""
    model = args.model
    agg = Engine("agg", model, "--max-model-len", str(args.max_model_len), *args.extra)
    pre = Engine("prefill", model, "--max-model-len", str(args.max_model_len), *args.extra, side_port=5600)
    dec = Engine("decode", model, "--max-model-len", str(args.max_model_len), *args.extra, side_port=5601)
    try:
        start(agg, pre, dec)
        for n in args.sizes or (300, 1000):
            prompt = prompt_of(n, seed=n)
            base = agg.generate(prompt, 32)
            local_d = dec.generate(prompt, 32)  # decode engine doing its own prefill (connector present, no params)
            dec.stats(reset=True)
            r = pd(pre, dec, prompt, 32)
            st = dec.stats(reset=True)
            print(f"\nprompt {n} tokens:")
            print(f"  prefill kv_transfer_params: {json.dumps(r['prefill'].get('kv_transfer_params'))[:400]}")
            print(f"  prefill finish={r['prefill'].get('finish_reason')} tokens={r['prefill'].get('token_ids')}")
            if not r["ok"]:
                print(f"  FAILED: {json.dumps(r, default=str)[:2000]}")
                continue
            d = r["decode"]
            print(f"  agg  tokens[:8]={base['token_ids'][:8]} ttft={base['ttft'] * 1e3:.1f}ms")
            print(
                f"  P/D  tokens[:8]={d['token_ids'][:8]} finish={d['finish_reason']} "
                f"num_cached_tokens={d['num_cached_tokens']}/{d.get('num_cached_tokens_final')}"
            )
            print(
                f"  (a) P/D == agg: {d['token_ids'] == base['token_ids']}; decode-local == agg: "
                f"{local_d['token_ids'] == base['token_ids']}"
            )
            if d["token_ids"] != base["token_ids"]:
                pairs = zip(d["token_ids"], base["token_ids"], strict=False)
                first = next((i for i, (x, y) in enumerate(pairs) if x != y), 0)
                print(
                    f"      first difference at output token {first}: agg {base['token_ids'][first : first + 6]} "
                    f"P/D {d['token_ids'][first : first + 6]} decode-local {local_d['token_ids'][first : first + 6]}"
                )
            print(f"  (b) decode prompt-token sources: {st['prompt_tokens']}; nixl: {nixl_summary(st)}")
            print(
                f"  TTFT agg {base['ttft'] * 1e3:.1f}ms, decode-local {local_d['ttft'] * 1e3:.1f}ms, "
                f"P/D: prefill leg {r['prefill_s'] * 1e3:.1f}ms + decode TTFT {d['ttft'] * 1e3:.1f}ms"
            )
            print(f"  prefill stats after: kv_usage={pre.stats()['kv_usage']:.4f}")
    finally:
        for e in (agg, pre, dec):
            e.stop()


# ---------------------------------------------------------------------------------------------------------------- sizes
def scenario_sizes(args: argparse.Namespace) -> None:
    """KV transfer time per prompt token and TTFT remote vs local for several prompt lengths."""
    model = args.model
    pre = Engine("prefill", model, "--max-model-len", str(args.max_model_len), *args.extra, side_port=5600)
    dec = Engine("decode", model, "--max-model-len", str(args.max_model_len), *args.extra, side_port=5601)
    rows = []
    try:
        start(pre, dec)
        pd(pre, dec, prompt_of(128, 1), 2)  # warm-up: first pull includes the NIXL handshake
        dec.generate(prompt_of(128, 2), 2)
        dec.stats(reset=True)
        print(
            f"\n{'tokens':>6} {'local TTFT':>11} {'P leg':>8} {'D TTFT':>8} {'remote TTFT':>12} {'xfer ms':>8} "
            f"{'MB':>7} {'us/tok':>7} {'ext tok':>8} {'same':>5}"
        )
        for n in args.sizes or (256, 1024, 2000):
            reps = []
            for rep in range(args.reps):
                prompt = prompt_of(n, seed=1000 * n + rep)
                loc = dec.generate(prompt, 4)  # local prefill on the decode engine
                dec.stats(reset=True)
                r = pd(pre, dec, prompt, 4)
                st = dec.stats(reset=True)
                if not r["ok"]:
                    print(f"  FAILED {n}: {json.dumps(r, default=str)[:1500]}")
                    continue
                ns = nixl_summary(st)
                reps.append(
                    dict(
                        local=loc["ttft"],
                        p=r["prefill_s"],
                        d=r["decode"]["ttft"],
                        remote=r["ttft_total"],
                        xfer=ns.get("xfer_ms_mean", float("nan")) / 1e3,
                        mb=ns.get("mb_mean", float("nan")),
                        ext=st["prompt_tokens"]["external_kv_transfer"],
                        same=loc["token_ids"] == r["decode"]["token_ids"],
                    )
                )
            if not reps:
                continue
            med = {k: statistics.median(x[k] for x in reps) for k in ("local", "p", "d", "remote", "xfer", "mb", "ext")}
            same = all(x["same"] for x in reps)
            rows.append(dict(tokens=n, **med, same=same, reps=len(reps)))
            print(
                f"{n:>6} {med['local'] * 1e3:>9.1f}ms {med['p'] * 1e3:>6.1f}ms {med['d'] * 1e3:>6.1f}ms "
                f"{med['remote'] * 1e3:>10.1f}ms {med['xfer'] * 1e3:>8.2f} {med['mb']:>7.2f} "
                f"{med['xfer'] * 1e6 / n:>7.2f} {med['ext']:>8.0f} {str(same):>5}",
                flush=True,
            )
        tag = (
            f"pt-{os.environ.get('NIXL_PROG_THREAD', 'spin')}"
            + ("-mp" if args.multiproc else "")
            + (f"-ucx-{os.environ['UCX_TLS']}" if os.environ.get("UCX_TLS") else "")
        )
        out = HERE / "results" / f"sizes-{Path(model).name}-{tag}.json"
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps(rows, indent=1))
        print(f"(medians of {args.reps}; written to {out})")
    finally:
        for e in (pre, dec):
            e.stop()


# ------------------------------------------------------------------------------------------------------------- failures
def scenario_failures(args: argparse.Namespace) -> None:
    """(c) what the decode side does when the prefill side's KV is not there."""
    model = args.model
    policy = args.policy
    common = ["--max-model-len", str(args.max_model_len), "--policy", policy, *args.extra]
    pre = Engine("prefill", model, *common, side_port=5600)
    dec = Engine("decode", model, *common, side_port=5601, name=f"decode-{policy}")
    try:
        start(pre, dec)
        prompt = prompt_of(300, 7)
        ref = dec.generate(prompt, 8)
        ok = pd(pre, dec, prompt_of(300, 8), 8)
        print(f"  sanity P/D ok={ok['ok']}")
        good = pre.generate(prompt, 1, {"do_remote_decode": True}, rid="p-good")["kv_transfer_params"]

        def show(label: str, r: dict[str, Any]) -> None:
            same = r.get("token_ids") == ref["token_ids"]
            print(
                f"\n[{label}] ok={r['ok']} finish={r.get('finish_reason')} ntok={len(r.get('token_ids', []))} "
                f"same_as_local={same} e2e={r['e2e']:.2f}s err={r.get('error')}"
            )
            st = dec.stats(reset=True)
            print(f"    decode prompt sources={st['prompt_tokens']} nixl={nixl_summary(st)}")

        dec.stats(reset=True)
        cases = {
            "bogus remote_block_ids (out of range)": dict(good, remote_block_ids=[[10**6 + i for i in range(10)]]),
            "unknown remote_engine_id, same host/port": dict(good, remote_engine_id="no-such-engine"),
            "nothing listening on remote_port": dict(good, remote_port=5999, remote_engine_id="ghost"),
            "remote_request_id unknown to P": dict(good, remote_request_id="p-nope"),
        }
        for label, params in cases.items():
            show(label, dec.generate(prompt, 8, params, timeout=120))
        # The genuine params still work after the failures (P kept the blocks pinned).
        show("genuine params after the failures", dec.generate(prompt, 8, good, timeout=120))

        # Prefill engine killed after it answered, before decode pulls.
        prompt2 = prompt_of(300, 9)
        ref2 = dec.generate(prompt2, 8)
        p2 = pre.generate(prompt2, 1, {"do_remote_decode": True}, rid="p-killed")
        pre.kill()
        time.sleep(1)
        t = time.perf_counter()
        r = dec.generate(prompt2, 8, p2["kv_transfer_params"], timeout=180)
        print(
            f"\n[prefill killed before pull] ok={r['ok']} finish={r.get('finish_reason')} "
            f"same_as_local={r.get('token_ids') == ref2['token_ids']} took={time.perf_counter() - t:.2f}s "
            f"err={r.get('error')}"
        )
        st = dec.stats(reset=True)
        print(f"    decode prompt sources={st['prompt_tokens']} nixl={nixl_summary(st)}")
        # And a second request to the dead prefill engine (handshake already cached vs not)
        r = dec.generate(prompt_of(300, 10), 8, dict(p2["kv_transfer_params"], remote_request_id="p-x"), timeout=180)
        print(f"[second request to dead prefill] ok={r['ok']} finish={r.get('finish_reason')} e2e={r['e2e']:.2f}s")
        print(f"    decode still healthy: {dec.generate(prompt_of(50, 11), 4)['ok']}")
    finally:
        for e in (pre, dec):
            e.stop()


# --------------------------------------------------------------------------------------------------------------- aborts
def scenario_aborts(args: argparse.Namespace) -> None:
    """(d) what stays allocated on either side after aborts / abandoned handoffs."""
    model = args.model
    common = ["--max-model-len", str(args.max_model_len), "--lease", str(args.lease), *args.extra]
    pre = Engine("prefill", model, *common, side_port=5600)
    dec = Engine("decode", model, *common, side_port=5601)
    pool = ThreadPoolExecutor(4)
    pool2 = ThreadPoolExecutor(16)
    probe = prompt_of(32, 424242)  # one block: used to make an idle engine step and report KV usage

    def usage(e: Engine) -> float:
        e.generate(probe, 1)
        return e.stats()["kv_usage"]

    try:
        start(pre, dec)
        pd(pre, dec, prompt_of(64, 1), 2)
        n = 1024
        print(f"  baseline usage: prefill={usage(pre):.4f} decode={usage(dec):.4f} (probe request of 1 block)")

        # 1. prefill finished, decode never pulls: blocks pinned until the lease expires
        p = pre.generate(prompt_of(n, 1), 1, {"do_remote_decode": True})
        t_done = time.perf_counter()
        print(f"\n[1] abandoned handoff ({n} tokens): prefill usage right after = {usage(pre):.4f}")
        c0 = sum(c for _, c in proc_tree_cpu(pre.proc.pid).values())
        time.sleep(4)
        c1 = sum(c for _, c in proc_tree_cpu(pre.proc.pid).values())
        print(f"    prefill CPU while holding the blocks: {(c1 - c0) / 4:.2f} cores")
        while time.perf_counter() - t_done < args.lease + 15:
            time.sleep(5)
            u = usage(pre)
            print(f"    t+{time.perf_counter() - t_done:5.1f}s prefill usage={u:.4f}", flush=True)
            if u < 0.01:
                break
        print(f"    prefill nixl stats: {nixl_summary(pre.stats(reset=True))}")

        # 2. decode rejects the handoff explicitly: notify_kv_transfer_request_rejected
        p = pre.generate(prompt_of(n, 2), 1, {"do_remote_decode": True})
        u0 = usage(pre)
        dec.call({"op": "reject", "rid": "d-reject", "kv_transfer_params": p["kv_transfer_params"]})
        time.sleep(1.0)
        print(
            f"\n[2] decode rejects via notify_kv_transfer_request_rejected: prefill usage {u0:.4f} -> {usage(pre):.4f}"
        )

        # 3. abort on the prefill side while it is prefilling (long prompt, abort right away)
        fut = pool.submit(pre.generate, prompt_of(2000, 3), 1, {"do_remote_decode": True}, "p-abort")
        time.sleep(0.02)
        pre.call({"op": "abort", "rid": "p-abort"})
        r = fut.result()
        print(
            f"\n[3] prefill aborted mid-request: finish={r.get('finish_reason')} params={r.get('kv_transfer_params')} "
            f"prefill usage after={usage(pre):.4f}"
        )

        # 4a. abort on the decode side before the pulled request is scheduled (decode batch full: max_num_seqs=16)
        fillers = [pool2.submit(dec.generate, prompt_of(64, 100 + i), 1500, None, f"fill-{i}") for i in range(16)]
        time.sleep(1.0)
        p = pre.generate(prompt_of(1000, 4), 1, {"do_remote_decode": True})
        u0 = usage(pre)
        fut = pool.submit(dec.generate, prompt_of(1000, 4), 16, p["kv_transfer_params"], "d-abort")
        time.sleep(0.5)
        st = dec.stats()
        dec.call({"op": "abort", "rid": "d-abort"})
        r = fut.result()
        time.sleep(0.5)
        print(
            f"\n[4a] decode aborted while queued (running={st.get('running')}, waiting={st.get('waiting')}): "
            f"finish={r.get('finish_reason')} ntok={len(r.get('token_ids', []))}; "
            f"prefill usage {u0:.4f} -> {usage(pre):.4f}"
        )
        for i in range(16):
            dec.call({"op": "abort", "rid": f"fill-{i}"})
        fr = [f.result() for f in fillers]
        print(
            f"     fillers: {[(x.get('finish_reason'), len(x.get('token_ids', [])), x.get('error')) for x in fr][:4]}"
        )

        # 4b. abort on the decode side while it waits on the KV handshake (peer that never answers: 5 s timeout)
        p = pre.generate(prompt_of(1000, 6), 1, {"do_remote_decode": True})
        bad = dict(p["kv_transfer_params"], remote_port=5999, remote_engine_id="ghost")
        t = time.perf_counter()
        fut = pool.submit(dec.generate, prompt_of(1000, 6), 16, bad, "d-abort-hs")
        time.sleep(1.0)
        st = dec.stats()
        dec.call({"op": "abort", "rid": "d-abort-hs"})
        r = fut.result()
        print(
            f"\n[4b] decode aborted while waiting on a handshake (kv_fetch_stages={st.get('kv_fetch_stages')}): "
            f"finish={r.get('finish_reason')} returned after {time.perf_counter() - t:.2f}s; "
            f"decode usage={usage(dec):.4f}"
        )

        # 5. abort on the decode side mid-decode (after the pull), prefill blocks already released
        p = pre.generate(prompt_of(1000, 5), 1, {"do_remote_decode": True})
        fut = pool.submit(dec.generate, prompt_of(1000, 5), 1000, p["kv_transfer_params"], "d-abort2")
        time.sleep(0.5)
        dec.call({"op": "abort", "rid": "d-abort2"})
        r = fut.result()
        time.sleep(0.5)
        print(
            f"\n[5] decode aborted mid-decode: finish={r.get('finish_reason')} ntok={len(r.get('token_ids', []))} "
            f"decode usage={usage(dec):.4f} prefill usage={usage(pre):.4f}"
        )
        print(f"    decode prompt sources={dec.stats(reset=True)['prompt_tokens']}")
        time.sleep(12)
        print(f"\n[end] 12 s later: decode usage={usage(dec):.4f} prefill usage={usage(pre):.4f}")
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        pool2.shutdown(wait=False, cancel_futures=True)
        for e in (pre, dec):
            e.stop()


# ---------------------------------------------------------------------------------------------------------------- proof
def perturbed_copy(model: str) -> str:
    """A copy of the model whose k_proj/v_proj weights are scaled: same tokens in, different KV out."""
    import shutil

    from safetensors.torch import load_file, save_file

    dst = Path("/tmp/nixl_spike_models") / (Path(model).name + "-perturbed-kv")
    if not (dst / "model.safetensors").exists():
        shutil.copytree(model, dst, dirs_exist_ok=True)
        w = load_file(str(Path(model) / "model.safetensors"))
        for k in w:
            if "k_proj" in k or "v_proj" in k:
                w[k] = w[k] * 3.0
        save_file(w, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return str(dst)


def scenario_proof(args: argparse.Namespace) -> None:
    """(b) KV is really pulled: a prefill engine with different k/v weights changes the decode output."""
    no_check = ["--extra-config", json.dumps({"enforce_handshake_compat": False})]
    common = ["--max-model-len", str(args.max_model_len), *args.extra]
    pert = perturbed_copy(args.model)
    agg = Engine("agg", args.model, *common)
    pre = Engine("prefill", pert, *common, *no_check, side_port=5600, name="prefill-perturbed")
    dec = Engine("decode", args.model, *common, *no_check, side_port=5601)
    try:
        start(agg, pre, dec)
        for n in (300, 1000):
            prompt = prompt_of(n, seed=n)
            base = agg.generate(prompt, 16)
            pert_local = pre.generate(prompt, 16)
            r = pd(pre, dec, prompt, 16)
            d = r["decode"]
            print(
                f"  {n} tokens: agg {base['token_ids'][:6]}, perturbed-model local {pert_local['token_ids'][:6]}, "
                f"P(perturbed)->D(original) {d['token_ids'][:6]}; P/D == agg: {d['token_ids'] == base['token_ids']}"
            )
    finally:
        for e in (agg, pre, dec):
            e.stop()


# ---------------------------------------------------------------------------------------------------------------- stale
def scenario_stale(args: argparse.Namespace) -> None:
    """Decode pulls after the prefill side's lease expired and its blocks were reused by other requests."""
    common = ["--max-model-len", str(args.max_model_len), *args.extra]
    pre = Engine("prefill", args.model, *common, "--kv-mib", "3", "--lease", "5", side_port=5600)  # 96 blocks
    dec = Engine("decode", args.model, *common, side_port=5601)
    try:
        start(pre, dec)
        pd(pre, dec, prompt_of(64, 1), 2)  # handshake
        a = prompt_of(1000, 11)
        ref = dec.generate(a, 16)
        p = pre.generate(a, 1, {"do_remote_decode": True})
        print(f"  A prefilled on blocks {p['kv_transfer_params']['remote_block_ids']}")
        time.sleep(12)  # > lease (5 s): prefill frees A's blocks
        for i in range(3):  # other traffic reuses the freed blocks
            pre.generate(prompt_of(1000, 20 + i), 1)
        t = time.perf_counter()
        pool = ThreadPoolExecutor(1)
        fut = pool.submit(dec.generate, a, 16, p["kv_transfer_params"], "d-late", 60)
        time.sleep(5)
        print(
            f"  late pull of A, prefill idle: finished after 5 s? {fut.done()}; decode kv_fetch_stages="
            f"{dec.stats().get('kv_fetch_stages')}"
        )
        pre.generate(prompt_of(40, 99), 1)  # any request makes the prefill engine step (and progress NIXL)
        r = fut.result()
        pool.shutdown()
        print(
            f"  after one request on the prefill engine: ok={r['ok']} finish={r.get('finish_reason')} "
            f"total {time.perf_counter() - t:.2f}s, output == local A: {r.get('token_ids') == ref['token_ids']}"
        )
        print(f"    local A: {ref['token_ids'][:8]}\n    late P/D: {r.get('token_ids', [])[:8]}")
        print(f"    decode: {dec.stats(reset=True)['prompt_tokens']}; prefill nixl: {nixl_summary(pre.stats())}")
    finally:
        for e in (pre, dec):
            e.stop()


# ----------------------------------------------------------------------------------------------------------------- agg2
def scenario_agg2(args: argparse.Namespace) -> None:
    """Control for the multiprocess slowdown: two engines WITHOUT a connector, local TTFT only."""
    common = ["--max-model-len", str(args.max_model_len), *args.extra]
    engines = [Engine("agg", args.model, *common, name=f"agg{i}") for i in range(args.engines)]
    try:
        start(*engines)
        for e in engines:
            e.generate(prompt_of(128, 2), 2)
        for n in args.sizes or (256, 1024, 2000):
            ttfts = [engines[0].generate(prompt_of(n, 1000 * n + rep), 4)["ttft"] for rep in range(args.reps)]
            print(
                f"  {n:>5} tokens: local TTFT median {statistics.median(ttfts) * 1e3:.1f} ms "
                f"({len(engines)} engine(s) up, multiproc={args.multiproc})",
                flush=True,
            )
    finally:
        for e in engines:
            e.stop()


# ----------------------------------------------------------------------------------------------------------------- idle
def proc_tree_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """CPU seconds (user+sys) of every process in a session, by pid."""
    out = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[3]) != pid:  # session id
                continue
            name = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:60]
            comm = stat[stat.index("(") + 1 : stat.rindex(")")]
            out[int(p.name)] = (comm or name, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
        except (OSError, ValueError):
            continue
    return out


def thread_cpu(sid: int) -> dict[str, tuple[str, float]]:
    """CPU seconds of every thread of every process in a session, by 'pid/tid'."""
    out = {}
    for pid in proc_tree_cpu(sid):
        for t in Path(f"/proc/{pid}/task").iterdir():
            try:
                stat = (t / "stat").read_text()
                f = stat[stat.rindex(")") + 2 :].split()
                comm = stat[stat.index("(") + 1 : stat.rindex(")")]
                out[f"{pid}/{t.name}"] = (comm, (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK"))
            except (OSError, ValueError):
                continue
    return out


def scenario_idle(args: argparse.Namespace) -> None:
    """CPU burnt by idle engines (OMP spin, NIXL/UCX progress threads)."""
    common = ["--max-model-len", str(args.max_model_len), *args.extra]
    pre = Engine("prefill", args.model, *common, side_port=5600)
    dec = Engine("decode", args.model, *common, side_port=5601)
    try:
        start(pre, dec)
        pd(pre, dec, prompt_of(300, 1), 4)
        time.sleep(2)
        for e in (pre, dec):
            before = proc_tree_cpu(e.proc.pid)
            time.sleep(10)
            after = proc_tree_cpu(e.proc.pid)
            print(
                f"  {e.name} idle CPU over 10 s: "
                + ", ".join(f"{after[p][0]}={after[p][1] - before.get(p, (None, 0))[1]:.2f}s" for p in after)
            )
        for e in (pre, dec):
            before = thread_cpu(e.proc.pid)
            time.sleep(5)
            after = thread_cpu(e.proc.pid)
            busy = sorted(((after[t][1] - before.get(t, ("", 0))[1], after[t][0]) for t in after), reverse=True)[:6]
            print(f"  {e.name} busiest threads over 5 s: " + ", ".join(f"{n}={c:.2f}s" for c, n in busy))
            if os.environ.get("SPIKE_PYSPY"):
                core = [p for p, (c, _) in proc_tree_cpu(e.proc.pid).items() if c.startswith("VLLM::EngineCor")]
                for p in core:
                    print(
                        subprocess.run(
                            ["py-spy", "dump", "--native", "--pid", str(p)], capture_output=True, text=True
                        ).stdout[-6000:]
                    )
        for n in (1000,):
            prompt = prompt_of(n, 5)
            loc = dec.generate(prompt, 4)
            r = pd(pre, dec, prompt, 4)
            print(
                f"  {n} tokens: decode-local TTFT {loc['ttft'] * 1e3:.1f} ms; P leg {r['prefill_s'] * 1e3:.1f} ms, "
                f"D TTFT {r['decode']['ttft'] * 1e3:.1f} ms; nixl {nixl_summary(dec.stats(reset=True))}"
            )
    finally:
        for e in (pre, dec):
            e.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("scenario", choices=["basic", "proof", "sizes", "failures", "aborts", "stale", "idle", "agg2"])
    ap.add_argument("--model", default=TINY)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--sizes", type=int, nargs="+", default=None)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--policy", choices=["fail", "recompute"], default="fail")
    ap.add_argument("--lease", type=int, default=30)
    ap.add_argument("--engines", type=int, default=2, help="agg2: number of engines")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="passed to engine_server.py")
    ap.add_argument(
        "--prog-thread",
        default=os.environ.get("NIXL_PROG_THREAD", "100"),
        help="NIXL progress thread: 'off', a delay in us (default 100), or 'spin' (nixl's default, 100%% CPU)",
    )
    ap.add_argument(
        "--multiproc", action="store_true", help="keep vLLM's worker in its own process (default: in EngineCore)"
    )
    args = ap.parse_args()
    # Environment inherited by every engine process (see NOTES.md for why).
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if args.multiproc else "0"
    if args.prog_thread != "spin":
        os.environ["NIXL_PROG_THREAD"] = args.prog_thread
        os.environ["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(HERE / "cpu_patch"), os.environ.get("PYTHONPATH")])
        )
    else:
        os.environ.pop("NIXL_PROG_THREAD", None)
    print(
        f"VLLM_ENABLE_V1_MULTIPROCESSING={os.environ['VLLM_ENABLE_V1_MULTIPROCESSING']} "
        f"NIXL_PROG_THREAD={os.environ.get('NIXL_PROG_THREAD', 'spin (unpatched)')}",
        flush=True,
    )
    t = time.perf_counter()
    {
        "idle": scenario_idle,
        "agg2": scenario_agg2,
        "proof": scenario_proof,
        "stale": scenario_stale,
        "basic": scenario_basic,
        "sizes": scenario_sizes,
        "failures": scenario_failures,
        "aborts": scenario_aborts,
    }[args.scenario](args)
    print(f"\n{args.scenario} done in {time.perf_counter() - t:.0f}s; engine logs in {LOG_DIR}")


if __name__ == "__main__":
    main()
