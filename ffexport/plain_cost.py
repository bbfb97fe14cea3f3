"""The measured WIDER FACE cost of `--dcn plain`, printed whenever it is used (benchmarks/RESULTS.md,
`python benchmarks/run.py --only plain`). Re-measure and update it when the models change."""

PLAIN_DCN_COST = ("measured on the WIDER FACE val subset (366 images, PyTorch, original size), V2 with plain convs "
                  "scores Easy/Medium/Hard AP 2.3/12.7/12.7 vs 93.4/92.1/76.9 with its deformable convs "
                  "(-91/-80/-64 points): the trained weights depend on the offsets, so this is for latency "
                  "experiments only, not a deployable detector")
