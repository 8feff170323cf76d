"""``bifrost chat``: attest a server and chat with it (the client side; ``bifrost serve`` is trusted code,
:mod:`bifrost.tee.serve_cli`)."""

from __future__ import annotations

import argparse
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("chat", help="attest a Bifrost server and chat with it (tokens streamed)")
    c.add_argument("--address", default="127.0.0.1:50061", help="host:port of `bifrost serve`")
    c.add_argument("--policy", required=True, help="attestation policy YAML (must pin the model digest)")
    c.add_argument("--prompt", help="one prompt, then exit (default: interactive; empty line quits)")
    c.add_argument("--max-new-tokens", type=int, default=0, help="0: the server's default")
    c.add_argument("--suite", default="AES-256-GCM", choices=("AES-256-GCM", "SM4-GCM"))
    c.add_argument("--tls-ca", help="connect with TLS, verifying the server certificate against this PEM CA file")
    c.add_argument("--seed", type=int, help="pin the sampling seed (when sampling)")
    c.add_argument("--temperature", type=float, help="0: greedy; up to 2 (default: the server's configuration)")
    c.add_argument("--top-p", type=float, help="nucleus sampling, in (0, 1] (default: the server's)")
    c.add_argument("--top-k", type=int, help="sample among the k likeliest tokens; 0: off (default: the server's)")
    c.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop when the reply contains TEXT (not printed); repeatable, up to 4")
    c.add_argument("--system", help="a system message: the prompt is then sent as chat messages, rendered by "
                                    "the model's chat template (each prompt on its own, without earlier turns)")
    c.set_defaults(func=run_chat)


def session_lost_line(reason: str, history_lost: bool, retried: bool) -> str:
    """The one line ``bifrost chat`` prints when the server lost its session (it attested a new one)."""
    return (f"[session lost ({reason}); attested a new session"
            + ("; the conversation history is lost" if history_lost else "")
            + ("; sending this prompt again]" if retried else "]"))


def run_chat(args: argparse.Namespace) -> int:
    """Exit 0; 1 when a turn ended because the session was lost and could not be resumed (``--prompt``), or
    when attesting a new session failed."""
    from ..attest.policy import load_policy
    from .client import BifrostClient, SessionLoss, SessionLostError

    def on_lost(loss: SessionLoss) -> None:
        if loss.retried:  # (otherwise the SessionLostError below says it)
            print(session_lost_line(loss.reason, loss.history_lost, True), file=sys.stderr, flush=True)

    policy = load_policy(args.policy)
    status = 0
    with BifrostClient(args.address, policy, suite=args.suite, tls_ca_file=args.tls_ca,
                       on_session_lost=on_lost) as client:
        verdict = client.attest()  # nothing is sent before this succeeds
        assert client.model_digest is not None  # attest() set it
        print(f"attested: {verdict.summary}; model digest {client.model_digest.hex()[:16]}…", file=sys.stderr)
        prompts = [args.prompt] if args.prompt is not None else None
        while True:
            if prompts is not None:
                if not prompts:
                    break
                prompt = prompts.pop()
            else:
                try:
                    prompt = input("> ")
                except EOFError:
                    break
                if not prompt:
                    break
            messages = [{"role": "system", "content": args.system}, {"role": "user", "content": prompt}] \
                if args.system is not None else None
            try:
                result = client.chat("" if messages else prompt, args.max_new_tokens, sample_seed=args.seed,
                                     on_text=lambda t: (sys.stdout.write(t), sys.stdout.flush()),
                                     temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                     stop=args.stop, messages=messages)
            except SessionLostError as exc:
                print()
                if not exc.reattested:
                    print(f"[session lost ({exc.session_lost}); {exc}]", file=sys.stderr, flush=True)
                    return 1
                line = session_lost_line(exc.session_lost or "?", exc.history_lost, False)[:-1]
                line += "; the reply above is incomplete]" if exc.partial else "; this prompt was not answered]"
                print(line, file=sys.stderr, flush=True)
                status = 1 if prompts is not None else status
                continue
            print()
            print(f"[{len(result.tokens)} tokens, finished: {result.finish_reason or '?'}] time to first token {result.ttft_s * 1000:.0f} ms, "
                  f"time per output token {result.tpot_s * 1000:.0f} ms", file=sys.stderr, flush=True)
    return status
