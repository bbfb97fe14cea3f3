"""The README's format table, built from `FORMATS` (tests/test_readme.py checks the README holds exactly it).

    python -m ffexport.formats.table        # print it (paste into README.md after a format changes)

Static text from each `Format`'s fields, never this machine's availability (`ffexport info` says what runs here).
"""


def _code(items):
    return ", ".join(f"`{x}`" for x in items)


def row(fmt) -> str:
    if fmt.reference:
        command = "(reference)"
    elif fmt.export is None:
        command = f"(runtime for `{fmt.export_as}` files)" if fmt.export_as else "(runtime)"
    else:
        command = f"`ffexport {fmt.name}`"
    precisions = ", ".join(fmt.precisions) + (" / " + ", ".join(fmt.quantize) if fmt.quantize else "")
    runs = (fmt.runs_on or "—") + ("; ARM (qemu/ssh)" if fmt.arm else "")
    return (f"| `{fmt.name}` | {command} | {_code(fmt.suffixes)} | {precisions} | {', '.join(fmt.dcn_forms)} | "
            f"{f'`{fmt.extra}`' if fmt.extra else '—'} | {runs} |")


def markdown_table(formats) -> str:
    """One row per format: name, command, files (suffixes), precisions / --quantize, --dcn forms (default
    first), pip extra, where its runner runs."""
    head = ["| format | command | files | precisions / `--quantize` | `--dcn` (default first) | extra | runs on |",
            "|---|---|---|---|---|---|---|"]
    return "\n".join(head + [row(f) for f in formats])


if __name__ == "__main__":
    from . import FORMATS

    print(markdown_table(FORMATS))
