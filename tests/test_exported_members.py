import types

import tokenrelay


def test_all_is_exactly_the_public_surface() -> None:
    exported = set(tokenrelay.__all__) - {"__version__"}
    public = {
        name
        for name in dir(tokenrelay)
        if not name.startswith("_")
        # Submodules appear as attributes once anything imports them; only the ones
        # in __all__ are part of the surface.
        and (not isinstance(getattr(tokenrelay, name), types.ModuleType) or name in exported)
    }
    assert exported == public
    for name in tokenrelay.__all__:
        assert hasattr(tokenrelay, name)
