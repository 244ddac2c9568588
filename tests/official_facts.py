"""Facts about the six released checkpoints that several tests hold the code to.

From the table of the official files in ``shared/official/README.md``: parameters
(params only; imagenet_conv's BatchNorm statistics are state) and their float32 bytes.
Kept once here, so that the trees, the fixtures, the JAX reference, the PyTorch models
and ``perceiver-convert models`` are all checked against the same numbers.
"""

OFFICIAL_PARAMETERS = {
    "language_perceiver": 201_108_230,
    "imagenet_learned": 62_255_848,
    "imagenet_fourier": 48_440_627,
    "imagenet_conv": 48_646_522,
    "optical_flow": 41_057_134,
    "video_autoencoding": 19_858_855,
}

OFFICIAL_FLOAT32_BYTES = {
    "language_perceiver": 804_432_920,
    "imagenet_learned": 249_023_392,
    "imagenet_fourier": 193_762_508,
    "imagenet_conv": 194_586_088,
    "optical_flow": 164_228_536,
    "video_autoencoding": 79_435_420,
}
