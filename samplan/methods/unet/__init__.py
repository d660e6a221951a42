"""unet: nnU-Net's plain convolutional U-Net (dynamic-network-architectures), the baseline of every comparison."""
