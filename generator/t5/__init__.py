"""TIGER's T5 design as a plug-in (the reference baseline): its model, decoders, featurisation, training system and
design entry, each module on the layer of generator it belongs to (see docs/architecture.md). It registers itself
through ``generator.t5.design`` (the design) and ``generator.t5.decoders`` (its decoders), which
``generator.designs.registry`` imports: no other module of the library names this package."""
