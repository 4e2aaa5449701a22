"""Command line of the model package: `python -m model {embed,convert,train,evaluate}`.

python -m model embed --checkpoint CKPT --inputs IN.npz --out OUT.npz [--audio-from-waveform]
python -m model convert CKPT OUT.safetensors
python -m model train --config train.yaml [--out-dir DIR] [--data-root DIR]
python -m model evaluate --embeddings EMB.npz [--out metrics.json]
python -m model evaluate --checkpoint CKPT --data DIR [--format folder] [--split test] [--out metrics.json]
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from common.atomic import atomic_save_npz, unwritable_reason
from common.cli import USAGE_ERROR_STATUS, OneLineParser
from common.memory import keep_freed_memory
from model.errors import ConfigError, InputError, Sat2SoundError
from model.train_config import DATA_FORMATS


def check_output(path: Path, fix: str) -> None:
    """Refuse, before any work, an output file that cannot be written at `path`; `fix` says what to pass."""
    if reason := unwritable_reason(path):
        raise ConfigError(f"cannot write {path} ({reason}); {fix}")


def path_argument(text: str) -> Path:
    """A path argument; an empty one is refused, not taken as the current folder (Path("") is ".")."""
    if not text:
        raise argparse.ArgumentTypeError("is empty; give a path (write . for the current folder)")
    return Path(text)


def _embed(args: argparse.Namespace) -> None:
    from model.checkpoint import checkpoint_config, load_model
    from model.evaluate import read_npz
    from model.reference import reference_batch, run_reference

    check_output(args.out, "pass --out a writable .npz path")
    arrays = read_npz(args.inputs, "in/... arrays in the parity-reference format")
    batch = reference_batch(arrays, checkpoint_config(args.checkpoint), from_waveform=args.audio_from_waveform)
    model, _ = load_model(args.checkpoint)
    outputs = run_reference(model, batch)
    atomic_save_npz(args.out, outputs)
    print(f"wrote {args.out}: {len(outputs)} arrays for {len(outputs['ctotal'])} samples")


def _convert(args: argparse.Namespace) -> None:
    from model.checkpoint import SAFETENSORS_SUFFIX, checkpoint_files, convert_to_safetensors

    if args.out.suffix != SAFETENSORS_SUFFIX:
        raise ConfigError(f"output {args.out} must end in {SAFETENSORS_SUFFIX}; name one, e.g. model.safetensors")
    for path in checkpoint_files(args.out):  # the weights and the .json config beside them
        check_output(path, f"pass a writable {SAFETENSORS_SUFFIX} path, with room for its .json beside it")
    weights, config = convert_to_safetensors(args.checkpoint, args.out)
    print(f"wrote {weights} and {config}")


def _train(args: argparse.Namespace) -> None:
    from model.train_config import load_settings
    from model.training import train

    settings = load_settings(args.config)
    if args.out_dir is not None:
        settings = replace(settings, out_dir=str(args.out_dir))
    if args.data_root is not None:
        settings = replace(settings, data=replace(settings.data, root=str(args.data_root)))
    result = train(settings)
    if not result.global_zero:
        return
    recall = "n/a" if result.best_recall is None else f"{result.best_recall:.3f}"
    print(f"trained {result.steps} steps in {result.seconds / 60:.1f} min; best validation recall {recall}")
    for path in result.exported:
        print(f"wrote {path}")


def _split_embeddings(args: argparse.Namespace) -> dict[str, np.ndarray]:
    from model.checkpoint import load_model
    from model.train_config import parse_settings
    from model.training import split_embeddings, text_cache

    model, _ = load_model(args.checkpoint)
    data = {"format": args.format, "root": args.data, "sat_type": model.cfg.sat_type, "num_workers": 0}
    settings = parse_settings({"out_dir": ".", "data": data, "text_cache": str(text_cache_folder(args))})
    embeddings = split_embeddings(model, text_cache(settings, model.cfg.text_dim), settings.data, args.split)
    return {name: getattr(embeddings, name).numpy() for name in embeddings._fields}


def user_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sat2sound-maps" / "text"


def text_cache_folder(args: argparse.Namespace) -> Path:
    return Path(args.text_cache) if args.text_cache else user_cache()


def _evaluate(args: argparse.Namespace) -> None:
    from model.evaluate import evaluate_embeddings, format_table, load_embeddings

    if (args.embeddings is None) == (args.checkpoint is None):
        raise InputError("give either --embeddings EMB.npz or --checkpoint CKPT with --data DIR")
    if args.checkpoint is not None and args.data is None:
        raise InputError("--checkpoint needs --data: the folder (or hf://datasets/OWNER/NAME) of the split")
    if args.out is not None:
        check_output(args.out, "pass --out a writable .json path")
    if args.checkpoint is not None:
        from model.training import check_cache_folder

        check_cache_folder(text_cache_folder(args), "--text-cache")
    arrays = load_embeddings(args.embeddings) if args.embeddings is not None else _split_embeddings(args)
    metrics = evaluate_embeddings(**arrays, out=args.out)
    print(format_table(metrics, gallery_size=len(arrays["image"])))
    if args.out is not None:
        print(f"wrote {args.out}")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m model", description="Sat2Sound model tools")
    commands = parser.add_subparsers(dest="command", required=True)
    embed = commands.add_parser("embed", help="run the model on an .npz in the parity-reference format")
    embed.add_argument("--checkpoint", required=True, help="path, or hf://OWNER/REPO/FILE")
    embed.add_argument("--inputs", required=True, type=path_argument, help=".npz with in/... arrays")
    embed.add_argument("--out", required=True, type=path_argument, help="output .npz")
    embed.add_argument("--audio-from-waveform", action="store_true", help="compute mel features from in/waveform_int16")
    embed.set_defaults(run=_embed)
    convert = commands.add_parser("convert", help="convert a .ckpt once to .safetensors + .json config")
    convert.add_argument("checkpoint", type=path_argument)
    convert.add_argument("out", type=path_argument, help="output .safetensors path")
    convert.set_defaults(run=_convert)
    train = commands.add_parser("train", help="train (or go on training) a model; resumes from the last checkpoint")
    train.add_argument(
        "--config", required=True, type=path_argument, help="training settings (.yaml; see README, Training)"
    )
    train.add_argument("--out-dir", type=path_argument, help="instead of the config's out_dir")
    train.add_argument("--data-root", type=path_argument, help="instead of the config's data.root")
    train.set_defaults(run=_train)
    evaluate = commands.add_parser("evaluate", help="image <-> audio retrieval metrics with the reference protocol")
    evaluate.add_argument(
        "--embeddings", type=path_argument, help=".npz with row-aligned image, audio, audio_caption arrays"
    )
    evaluate.add_argument("--checkpoint", help="or: a checkpoint to embed a data split with (path or hf://...)")
    evaluate.add_argument("--data", help="the split's data: a folder, or hf://datasets/OWNER/NAME")
    evaluate.add_argument("--format", default="folder", choices=DATA_FORMATS)
    evaluate.add_argument("--split", default="test", help="split to evaluate (default: test)")
    evaluate.add_argument("--text-cache", help="cached caption states (default: ~/.cache/sat2sound-maps/text)")
    evaluate.add_argument("--out", type=path_argument, help="metrics .json (the table is printed either way)")
    evaluate.set_defaults(run=_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    keep_freed_memory()
    try:
        args.run(args)
    except (Sat2SoundError, FileNotFoundError, PermissionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USAGE_ERROR_STATUS
    return 0


if __name__ == "__main__":
    sys.exit(main())
