"""``segmentation``: COCO instance segmentation with Mask2Former (spec, run, model code, demo model)."""
