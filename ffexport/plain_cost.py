"""The measured WIDER FACE cost of `--dcn plain`, printed whenever it is used (ffexport/measured.json, from
`python benchmarks/run.py --only plain` then `--measured`). Re-measure it when the models change."""
from .measured import ap_text, measured


def plain_dcn_cost() -> str:
    m = measured("plain_dcn")
    drop = "/".join(f"{p - d:+.0f}" for p, d in zip(m["plain"], m["dcn"]))
    return (f"measured on the WIDER FACE val subset ({m['images']} images, PyTorch, original size), "
            f"{m['model'].upper()} with plain convs scores Easy/Medium/Hard AP {ap_text(m['plain'])} vs "
            f"{ap_text(m['dcn'])} with its deformable convs ({drop} points): the trained weights depend on the "
            "offsets, so this is for latency experiments only, not a deployable detector")


PLAIN_DCN_COST = plain_dcn_cost()
