"""lfvila.data: decoding (DALI / PyAV), sampling rules, dataset adapters, synthetic long-form data, loaders.

Layout contract: a decoded video is ``uint8 (T, H, W, C)`` (DALI's "FHWC"), a batch ``uint8 (B, T, H, W, C)``;
normalisation (ImageNet mean/std) and the move to float happen on the device.
"""
