"""``mlp-fusion info``: what a fused checkpoint holds, read from its files without building the model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SETTINGS_SHOWN = ("keep_fraction", "canonical", "weighting", "refit", "ridge", "budget", "n_init")
STEPS_SHOWN = ("reconstruct_steps", "block_steps")  # shown only when used


def add_parser(commands) -> None:
    info = commands.add_parser(
        "info", help="show what a fused checkpoint holds: sites, widths, methods, settings"
    )
    info.add_argument(
        "fused", type=Path, help="directory written by 'compress --out', 'finetune' or save_pretrained"
    )
    info.add_argument("--json", action="store_true", help="print fusion.json and the parameter count as JSON")
    info.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..persistence import info

    fusion = info(args.fused)
    if args.json:
        print(json.dumps(fusion))
        return 0
    print(f"{args.fused}: {fusion['architecture']} from {fusion.get('source_model') or 'an unnamed model'}")
    print(
        f"format {fusion['format_version']}, written by mlp-fusion {fusion.get('library_version', '?')}, "
        f"dtype {fusion.get('dtype', '?')}, {fusion['parameters']:,} stored numbers (weights and scales)"
    )
    recipe = fusion.get("recipe")
    if recipe is not None:
        source = recipe.get("calibration") or {}
        shown = ", ".join(f"{k} {v}" for k, v in source.items() if k != "source")
        calibration = f"calibration {source['source']} ({shown})" if source else "no calibration"
        print(f"recipe {recipe['name']}: {calibration}")
        healed = recipe.get("heal")
        if healed:
            print(
                f"healed: {healed['steps']} steps on {healed['texts']} {healed['source']} texts, "
                f"lr {healed['lr']} {healed.get('schedule', 'constant')}, {healed['train']} weights, {healed.get('precision', 'float32')}, "
                f"KL {healed['kl_first']:.4f} -> {healed['kl_last']:.4f}"
            )
    print(
        f"{'layer':>5} {'experts':>7} {'width':>13} {'method':>7} {'scale':>5} {'rank':>5}  settings / module"
    )
    for site in fusion["sites"]:
        settings = site.get("settings") or {}
        names = [k for k in SETTINGS_SHOWN if settings.get(k) is not None]
        names += [k for k in STEPS_SHOWN if settings.get(k)]
        shown = ", ".join(f"{k}={settings[k]}" for k in names)
        print(
            f"{site['layer']:>5} {site.get('experts') or '-':>7} {site['width_before']:>6} -> {site['width']:<4} "
            f"{site['method']:>7} {'yes' if site.get('scaled') else 'no':>5} {site.get('rank') or '-':>5}  "
            f"{site['name']}" + (f" ({shown})" if shown else "")
        )
    if not fusion["sites"]:
        print("no fused MLP (a full model saved in the fused format)")
    return 0
