"""The sans-I/O core of Talos.

Nothing in this package performs I/O, reads a clock or draws OS randomness:
time arrives as an argument or through an injected :class:`~talos.core.clock.Clock`,
randomness through an injected :class:`~talos.core.rng.Rng`. An import-linter
contract in ``pyproject.toml`` enforces it.
"""
