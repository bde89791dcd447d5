"""Training entry points and the training loop (run from the checkout: ``python -m train.pretrain ...``)."""
