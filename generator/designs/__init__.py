"""The designs: each registers its model config, presets, training defaults, model builder, featurisation, training
setup and extra loading in one place (``base.Design``); ``registry`` lists them and holds the one checkpoint loader."""
