"""Thin entrypoints: parse arguments, call resnet/."""
