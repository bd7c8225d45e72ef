"""The `shardserve` command: generate, serve, bench."""
from __future__ import annotations

import argparse
import sys
import time

from shardserve.engine.engine_args import EngineArgs


def _generate(ns: argparse.Namespace) -> int:
    from shardserve.entrypoints.llm import LLM
    from shardserve.sampling_params import SamplingParams

    params = SamplingParams(temperature=ns.temperature, max_tokens=ns.max_tokens, top_p=ns.top_p, top_k=ns.top_k,
                            seed=ns.sampling_seed)
    t0 = time.perf_counter()
    args = EngineArgs.from_cli_args(ns)
    llm = LLM(**vars(args))
    try:
        load_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        if ns.chat:
            outs = llm.chat([[{"role": "user", "content": p}] for p in ns.prompts], params, use_tqdm=False)
        else:
            outs = llm.generate(ns.prompts, params, use_tqdm=False)
        gen_s = time.perf_counter() - t1
    finally:
        llm.shutdown()
    n_out = 0
    for prompt, out in zip(ns.prompts, outs):
        comp = out.outputs[0]
        n_out += len(comp.token_ids)
        print(f"--- {prompt!r}")
        print(comp.text if out.error is None else f"[error] {out.error}")
    layout = f"tp={args.tensor_parallel_size} pp={args.pipeline_parallel_size}"
    print(f"--- {len(outs)} prompts, {n_out} tokens in {gen_s:.2f} s ({n_out / max(gen_s, 1e-9):.1f} tok/s), "
          f"{layout}, start-up {load_s:.1f} s", file=sys.stderr)
    return 0


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_tag", nargs="?", default=None, metavar="MODEL")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--served-model-name", default=None)
    parser.add_argument("--max-waiting-requests", type=int, default=2048, metavar="N",
                        help="answer 503 with Retry-After once N sequences wait for a running slot (default 2048; "
                             "one request may queue up to 1,024)")
    parser.add_argument("--log-level", default="warning")
    parser.add_argument("--timeout-keep-alive", type=float, default=5.0, metavar="S",
                        help="close a connection with no request in progress after S seconds idle (default 5)")
    parser.add_argument("--timeout-request-header", type=float, default=10.0, metavar="S",
                        help="close a connection whose request head is not complete S seconds after it could "
                             "start, however slowly it trickles in (default 10)")
    parser.add_argument("--shutdown-timeout", type=float, default=10.0, metavar="S",
                        help="on SIGTERM/SIGINT stop taking requests (503) and let those in progress finish for up to "
                             "S seconds; then end each remaining stream with an error event and [DONE], answer each "
                             "remaining non-streaming request 503, stop the workers and exit 0 (default 10)")
    parser.add_argument("--headless", action="store_true",
                        help="run only this node's ranks for node 0's engine (with --nnodes, --node-rank >= 1, "
                             "--master-addr, --master-port; no API server)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text for prompts and print it")
    EngineArgs.add_cli_args(gen)
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=-1)
    gen.add_argument("--sampling-seed", type=int, default=None)
    gen.add_argument("--raw", dest="chat", action="store_false",
                     help="send prompts as raw text instead of through the chat template")
    gen.add_argument("prompts", nargs="+", metavar="PROMPT")
    gen.set_defaults(func=_generate)

    serve = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server")
    EngineArgs.add_cli_args(serve)
    add_serve_args(serve)
    serve.set_defaults(func=_serve)

    bench = sub.add_parser("bench", help="benchmarks: throughput, serve, allreduce")
    bench.add_argument("which", choices=["throughput", "serve", "allreduce"])
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    bench.set_defaults(func=_bench)
    return parser


def _serve(ns: argparse.Namespace) -> int:
    if ns.headless:
        from shardserve.executor.node_agent import run_headless
        return run_headless(ns.nnodes, ns.node_rank, ns.master_addr, ns.master_port, ns.distributed_timeout_seconds)
    from shardserve.entrypoints.openai.server import run_server
    return run_server(ns)


def _bench(ns: argparse.Namespace) -> int:
    """Runs benchmarks/<which>.py from the source tree (installed editable) through its main(argv)."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / f"{ns.which}.py"
    if not script.exists():
        raise FileNotFoundError(f"{script} not found: `shardserve bench` needs the source checkout")
    spec = importlib.util.spec_from_file_location(f"benchmarks_{ns.which}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(ns.rest) or 0


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        return ns.func(ns)
    except (ValueError, FileNotFoundError, ConnectionError) as exc:
        print(f"shardserve: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
