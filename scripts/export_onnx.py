"""Export a saved policy as one ONNX graph: `drifting-export-onnx` from a checkout. The code is
drifting_vla/cli/export_onnx.py."""

from drifting_vla.cli.export_onnx import main

if __name__ == "__main__":
    main()
