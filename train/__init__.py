"""ResNet ImageNet training service: model, command line, callbacks."""
