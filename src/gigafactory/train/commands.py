"""`gigafactory train`, `chat` and `demo`."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.console import Console

from gigafactory.train.config import option_help

console = Console()


def train(
    model: str = typer.Option("small", help="preset (tiny, small, grok-1, grok-2) or a .toml/.json spec"),
    steps: int = typer.Option(300, help="optimizer steps; the learning-rate schedule spans them"),
    run_dir: Path = typer.Option(Path("runs/default"), help="where the spec, tokenizer, metrics, checkpoints go"),
    data: Path | None = typer.Option(None, help="UTF-8 text file or folder, or a dataset from `gigafactory data "
                                     "prepare` (default: built-in Shakespeare)"),
    data_mix: str | None = typer.Option(None, help="prepared datasets with weights, e.g. web=0.7,posts=0.3"),
    tokenizer: str | None = typer.Option(None, help="bpe, grok-1 (the release's SentencePiece) or auto (default: "
                                         "grok-1 for the grok-1 preset, else bpe)"),
    seed: int = typer.Option(0),
    resume: bool = typer.Option(False, help="continue from the newest good checkpoint in --run-dir"),
    auto_resume: bool = typer.Option(False, help="resume if --run-dir has a checkpoint, else start (for requeues)"),
    batch_size: int | None = typer.Option(None, help="sequences per optimizer step"),
    grad_accum: int | None = typer.Option(None, help="micro-batches per optimizer step"),
    seq_len: int | None = typer.Option(None, help="tokens per sequence (default: the model's context)"),
    lr: float | None = typer.Option(None, help="peak learning rate"),
    warmup_steps: int | None = typer.Option(None),
    eval_every: int | None = typer.Option(None),
    checkpoint_every: str | None = typer.Option(None, help="steps between checkpoints, or 'auto' (Young/Daly)"),
    async_checkpoint: bool | None = typer.Option(None, "--async-checkpoint/--sync-checkpoint",
                                                 help="write checkpoints in the background (default: async)"),
    fleet_gpus: int | None = typer.Option(None, help="GPU count whose MTBF sets --checkpoint-every auto"),
    max_bad_steps: int | None = typer.Option(None, help="non-finite steps in a row before rolling back; 0 = never"),
    hang_timeout: float | None = typer.Option(None, help="watchdog seconds without a step before a rank exits"),
    keep_last: int | None = typer.Option(None, help="checkpoints to keep"),
    peer_snapshot_every: int | None = typer.Option(None, help="steps between snapshots of each rank's state into a "
                                                   "peer's host memory (restarts skip the disk); 0 = off"),
    stop_after: int | None = typer.Option(None, help="stop at this step with a checkpoint (time-boxed job)"),
    dtype: str | None = typer.Option(None, help="auto, fp32 or bf16 (autocast)"),
    moe_capacity_factor: float | None = typer.Option(None, help=option_help("moe_capacity_factor")),
    layout: str | None = typer.Option(None, help="parallel layout under torchrun, e.g. dp_shard=2,tp=2"),
    plan: Path | None = typer.Option(None, help="plan.json from `gigafactory plan --export`: layout, batch, steps"),
    compare_plan: bool = typer.Option(False, help="print measured bytes per collective beside the planner's"),
    dry_run: bool = typer.Option(False, help="one step at the true world size on fake tensors and a fake process "
                                 "group: per-rank memory and collective bytes beside the planner's; trains nothing"),
    world_size: int | None = typer.Option(None, help="--dry-run: ranks to simulate (default: the plan's GPUs, "
                                          "else the layout's product)"),
    json_out: bool = typer.Option(False, "--json", help="--dry-run: print the report as JSON"),
) -> None:
    """Train a Grok-style MoE model on a text corpus (one process, or one rank of a torchrun job)."""
    from gigafactory.train.threads import shared_machine_env

    shared_machine_env()  # before torch loads: OpenMP reads it once
    from gigafactory.train import distributed
    from gigafactory.train.config import make_config
    from gigafactory.train.loop import train as run

    options = dict(
        model=model, steps=steps, run_dir=run_dir, data=data, data_mix=data_mix, tokenizer=tokenizer, seed=seed,
        resume=resume,
        batch_size=batch_size,
        grad_accum=grad_accum, seq_len=seq_len, lr=lr, warmup_steps=warmup_steps, eval_every=eval_every,
        checkpoint_every=checkpoint_every, keep_last=keep_last, stop_after=stop_after, dtype=dtype, layout=layout,
        async_checkpoint=async_checkpoint, auto_resume=auto_resume, fleet_gpus=fleet_gpus, max_bad_steps=max_bad_steps,
        hang_timeout_s=hang_timeout, peer_snapshot_every=peer_snapshot_every, moe_capacity_factor=moe_capacity_factor,
    )
    cfg = make_config(**distributed.with_plan(options, plan))
    if dry_run:
        from gigafactory.train.dryrun import run_from_config

        run_from_config(cfg, plan, world_size, json_out, console)
        return
    result = run(cfg)
    if not distributed.finish(cfg, compare_plan, console):
        return
    bpb = f"{result.final_val_bpb:.3f} bits per byte" if result.final_val_bpb is not None else "n/a"
    console.print(f"run directory: {result.run_dir}  (final validation {bpb})", highlight=False)


def chat(
    run_dir: Path | None = typer.Argument(None, help="a run directory written by `gigafactory train`"),
    persona: str = typer.Option("ROMEO", help="a speaker of the corpus (see personas.json in the run)"),
    prompt: str | None = typer.Option(None, help="one turn: print the reply and exit"),
    max_tokens: int = typer.Option(120, min=1),
    temperature: float = typer.Option(0.8, min=0.0, help="0 = greedy"),
    top_k: int = typer.Option(0, min=0, help="0 = off"),
    top_p: float = typer.Option(0.95, min=0.0, max=1.0),
    seed: int | None = typer.Option(None),
    url: str | None = typer.Option(None, help="talk to a `gigafactory serve` server instead of a run directory"),
    weights: str = typer.Option("full", help="full, or int8 (per-channel 8-bit linear and expert weights)"),
) -> None:
    """Talk to a persona of a trained run (interactive, or one turn with --prompt)."""
    if url is not None:
        from gigafactory.serve.client import chat_remote

        chat_remote(url, persona, prompt, lambda s: console.out(s, end="", highlight=False), lambda: input("you> "),
                    max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        return
    if run_dir is None:
        from gigafactory.errors import UserError

        raise UserError("give a run directory, or --url of a running `gigafactory serve`")
    from gigafactory.chat import ChatSession

    session = ChatSession(run_dir, persona, weights)

    def turn(message: str) -> None:
        console.print(f"[bold]{session.persona}:[/]", highlight=False)
        for piece in session.reply(message, max_tokens, temperature, top_k, top_p, seed):
            console.out(piece, end="", highlight=False)
        console.out("")

    try:
        if prompt is not None:
            turn(prompt)
            return
        console.print(f"chatting with {session.persona} (checkpoint step {session.step}); empty line or Ctrl-D ends")
        while True:
            try:
                message = input("you> ").strip()
            except EOFError:
                break
            if not message:
                break
            turn(message)
    finally:
        # Join the engine thread before the interpreter exits: a daemon thread still inside a torch op at
        # shutdown aborts the process ("terminate called without an active exception", exit -6).
        session.close()


def demo(
    run_dir: Path = typer.Option(Path("runs/demo"), help="run directory for the demo"),
    steps: int = typer.Option(120, help="training steps (16 x 256 tokens each)"),
) -> None:
    """Train the `small` Grok on the built-in Shakespeare corpus, then ask a persona one question."""
    import shutil

    from gigafactory.chat import ChatSession
    from gigafactory.train.config import make_config
    from gigafactory.train.loop import train as run

    t0 = time.perf_counter()
    shutil.rmtree(run_dir, ignore_errors=True)  # the demo always starts fresh
    result = run(
        make_config(
            model="small", steps=steps, run_dir=run_dir, lr=5e-3, warmup_steps=12, eval_every=40,
            checkpoint_every=40,
        )
    )
    console.print(
        f"trained in {time.perf_counter() - t0:.0f} s; final validation {result.final_val_bpb:.3f} bits per byte",
        highlight=False,
    )
    console.print(f"run directory: {run_dir}", highlight=False)
    session = ChatSession(run_dir, "ROMEO")
    question = "What light through yonder window breaks?"
    console.print(f"[bold]Stranger:[/] {question}", highlight=False)
    console.print(f"[bold]{session.persona}:[/]", highlight=False)
    try:
        console.out("".join(session.reply(question, seed=0)).strip(), highlight=False)
    finally:
        session.close()


def register(app: typer.Typer) -> None:
    app.command("train")(train)
    app.command("chat")(chat)
    app.command("demo")(demo)
