"""``bifrost policy``: the shipped placement policies, and where each layer of a model runs under one.

Public information only (the policy and the model's structure): nothing here holds a key or a prompt.
"""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("policy", help="placement policies: what runs in the TEE and what the accelerator learns")
    psub = p.add_subparsers(dest="policy_command", metavar="SUBCOMMAND", required=True)
    ls = psub.add_parser("list", help="the shipped policies (configs/policies/)")
    ls.set_defaults(func=run_list)
    show = psub.add_parser("show", help="per layer of a model: where it runs and what the accelerator learns")
    show.add_argument("policy", help="policy name (configs/policies/) or a YAML path")
    show.add_argument("--model", required=True, help="model name (configs/models.yaml) or a checkpoint directory")
    show.add_argument("--adapter", help="a LoRA adapter directory (peft) on top of the model")
    show.add_argument("--seed", type=int, default=0, help="seed of random-init named models")
    show.add_argument("--json", action="store_true", help="print JSON instead of tables")
    show.set_defaults(func=run_show)


def run_list(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from .placement import load_placement_policy, policy_names

    table = Table(title="placement policies (configs/policies/)")
    for col in ("policy", "digest", "description"):
        table.add_column(col)
    for name in policy_names():
        p = load_placement_policy(name)
        table.add_row(name, p.digest()[:16], p.description)
    Console().print(table)
    return 0


def run_show(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from ..config_loader import load_config
    from .catalog import load_model, resolve
    from .delegation import fuse_groups
    from .placement import load_placement_policy, plan

    policy = load_placement_policy(args.policy)
    model = load_model(resolve(args.model), args.seed, adapter=args.adapter)
    layers = plan(model, policy, args.model)
    delegated = [layer.name for layer in layers if layer.placement == "ckks"]
    calls = len(fuse_groups(delegated, load_config().delegation)) if delegated else 0
    summary = {"policy": policy.name, "policy_digest": policy.digest(), "model": args.model,
               "adapter": args.adapter, "linear_layers": len(layers), "delegated_layers": len(delegated),
               "worker_calls_per_token": calls,
               "weights_on_accelerator": sum(layer.d_in * layer.d_out for layer in layers if layer.placement == "ckks"),
               "weights_in_tee": sum(layer.d_in * layer.d_out for layer in layers if layer.placement == "tee")}
    if args.json:
        print(json.dumps({**summary, "layers": [
            {"name": layer.name, "role": layer.role, "placement": layer.placement, "d_in": layer.d_in,
             "d_out": layer.d_out, "accelerator_learns_weights": layer.accelerator_sees_weights,
             "accelerator_learns_activations": False} for layer in layers]}, indent=2))
        return 0
    console = Console()
    table = Table(title=f"policy {policy.name} on {args.model}" + (f" + adapter {args.adapter}" if args.adapter else ""))
    table.add_column("layer", overflow="fold")
    for col in ("role", "shape", "runs in", "accelerator learns the weights", "... the activations"):
        table.add_column(col)
    for layer in layers:
        where = "CKKS worker" if layer.placement == "ckks" else "TEE"
        table.add_row(layer.name, layer.role, f"{layer.d_in}→{layer.d_out}", where,
                      "yes" if layer.accelerator_sees_weights else "no", "never")
    console.print(table)
    console.print(f"{summary['delegated_layers']} of {summary['linear_layers']} linear layers delegated "
                  f"({calls} worker calls per token); weights on the accelerator: "
                  f"{summary['weights_on_accelerator']:,} parameters, in the TEE only: "
                  f"{summary['weights_in_tee']:,}. Embeddings, norms, attention scores, activations, the KV cache and "
                  f"sampling always run in the TEE. Policy digest {policy.digest()[:16]}… (bound into the "
                  f"serving-config digest).")
    return 0
