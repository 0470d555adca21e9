"""Search spaces from the command line: their choices, sampled subnets, the costs of one."""

from __future__ import annotations

import json
import random
from pathlib import Path

import typer
from rich.table import Table

from flows.cli.common import (
    ChannelsOpt,
    ClassesOpt,
    PresetArg,
    ResOpt,
    _channels,
    _space,
    app,
    console,
    fail,
)


@app.command()
def space(
    preset: str = PresetArg,
    num_classes: int = ClassesOpt,
    in_channels: int | None = ChannelsOpt,
    resolutions: str | None = ResOpt,
) -> None:
    """Show a search space: its choices and the cost range of its subnets."""
    from tofa_core.costs import count_macs, count_params

    sp = _space(preset, num_classes, _channels(preset, in_channels), resolutions)
    table = Table(title=f"search space {sp.name}")
    table.add_column("setting")
    table.add_column("choices")
    table.add_row("resolution", ", ".join(map(str, sp.resolutions)))
    table.add_row("width", ", ".join(map(str, sp.width_choices)))
    table.add_row("depth per stage", f"{', '.join(map(str, sp.depth_choices))} (x{len(sp.stages)} stages)")
    table.add_row("kernel per block", ", ".join(map(str, sp.kernel_choices)))
    table.add_row("expand per block", ", ".join(map(str, sp.expand_choices)))
    for label, arch in (("smallest", sp.min_arch()), ("largest", sp.max_arch())):
        table.add_row(f"{label} subnet", f"{count_macs(arch, sp):,} MACs, {count_params(arch, sp):,} params")
    console.print(table)


@app.command()
def sample(
    preset: str = PresetArg,
    count: int = typer.Option(
        5, "--count", min=1, help="How many random subnets (plus the largest and smallest)."
    ),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
    num_classes: int = ClassesOpt,
    in_channels: int | None = ChannelsOpt,
    resolutions: str | None = ResOpt,
    verify: bool = typer.Option(
        True, help="Extract each subnet and check it computes what the supernet does."
    ),
    json_out: Path | None = typer.Option(None, "--json-out", help="Write the subnets and their costs here."),
) -> None:
    """Sample subnets of a fresh supernet, with their costs; extract and verify each one."""
    import torch

    from tofa_core.costs import count_macs, count_params
    from tofa_core.supernet import Supernet

    sp = _space(preset, num_classes, _channels(preset, in_channels), resolutions)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    net = Supernet(sp).eval()
    archs = [sp.max_arch(), sp.min_arch()] + [sp.sample(rng) for _ in range(count)]
    table = Table(title=f"{len(archs)} subnets of {sp.name}")
    for col in ("res", "width", "depths", "MACs", "params") + (("max |diff|",) if verify else ()):
        table.add_column(col, justify="right")
    rows, worst = [], 0.0
    for arch in archs:
        row = {
            "arch": arch.to_dict(),
            "macs": count_macs(arch, sp),
            "params": count_params(arch, sp),
        }
        cells = [
            str(arch.resolution),
            str(arch.width),
            str(list(arch.depths)),
            f"{row['macs']:,}",
            f"{row['params']:,}",
        ]
        if verify:
            x = torch.randn(4, sp.in_channels, arch.resolution, arch.resolution)
            with torch.no_grad():
                diff = (net(x, arch) - net.extract(arch).eval()(x)).abs().max().item()
            row["max_abs_diff"] = diff
            worst = max(worst, diff)
            cells.append(f"{diff:.1e}")
        rows.append(row)
        table.add_row(*cells)
    console.print(table)
    if json_out:
        json_out.write_text(json.dumps(rows, indent=2))
        console.print(f"wrote {json_out}")
    from tofa_core.formats import MAX_ABS_DIFF

    if verify and worst > MAX_ABS_DIFF:
        fail(f"an extracted subnet differs from the supernet by {worst:.2e}; this is a bug, please report it")


@app.command()
def costs(
    arch_json: str = typer.Argument(..., help="An Arch as JSON text, or a path to a JSON file holding one."),
    preset: str = typer.Option("tiny", "--space", help="Search space preset the Arch belongs to."),
    num_classes: int = ClassesOpt,
    in_channels: int | None = ChannelsOpt,
    resolutions: str | None = ResOpt,
) -> None:
    """Print the MACs, parameters and layers of one architecture."""
    from tofa_core.arch import Arch
    from tofa_core.costs import count_macs, count_params, layers

    sp = _space(preset, num_classes, _channels(preset, in_channels), resolutions)
    text = (
        Path(arch_json).read_text() if arch_json.endswith(".json") and Path(arch_json).exists() else arch_json
    )
    try:
        arch = sp.validate(Arch.from_json(text))
    except (ValueError, TypeError) as err:  # JSONDecodeError is a ValueError
        fail(f"not a valid Arch for space {sp.name!r}: {err}")
    table = Table(title=f"{count_macs(arch, sp):,} MACs, {count_params(arch, sp):,} params")
    for col in ("layer", "kind", "in", "out", "k", "s", "size", "MACs", "params"):
        table.add_column(col, justify="right")
    for spec in layers(arch, sp):
        table.add_row(
            spec.name,
            spec.kind,
            str(spec.cin),
            str(spec.cout),
            str(spec.kernel),
            str(spec.stride),
            str(spec.in_size),
            f"{spec.macs:,}",
            f"{spec.params:,}",
        )
    console.print(table)
