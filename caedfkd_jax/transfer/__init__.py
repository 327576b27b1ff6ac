"""Dense transfer (issue 27, under way): what `caedfkd transfer` will fine-tune and score with.
`data` (NYUv2's MTAN layout, ADE20K-style folders, their augmentations), `heads` (ASPP,
DeepLabV3(+), the linear probe), `losses` and `metrics` (LibMTL's), `procedural_nyu` (proxy data)."""
