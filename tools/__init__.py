"""Tools of a source checkout, not installed with the package: training the embedded tiny-shapes model
(`python tools/train_tiny_shapes.py`) and the logs of its experiments (tools/experiments/)."""
