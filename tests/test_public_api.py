"""The package's public names are the functions, whatever was imported before."""



def test_public_functions_are_functions_not_modules():
    import ompq_plugin.ptq  # noqa: F401  (imports the quantizer module as a side effect)

    for name in ("search", "quantize", "calibrate", "finetune", "evaluate", "export_qonnx"):
        assert callable(getattr(ompq_plugin, name)), name
    from ompq_plugin import evaluate, quantize, search

    assert (search.__name__, quantize.__name__, evaluate.__name__) == (
        "search", "quantize", "evaluate")
