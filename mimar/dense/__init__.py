"""Dense downstream: the scene benchmark, COCO-format data, pyramids, UPerNet and Faster R-CNN
heads, and their training on the fine-tuning engine (``mimar eval segment | detect``)."""
