"""What a CLI printed, as one line of words: rich draws errors in a box as wide as the console
and wraps long ones (a long tmp path moves the break), so the box's edges are dropped too."""

import re

BOX = re.compile(r"[│╭╮╰╯─]")


def plain(output: str) -> str:
    return " ".join(BOX.sub(" ", output).split())
