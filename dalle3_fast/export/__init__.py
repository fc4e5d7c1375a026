"""ONNX and TensorRT export of the pipeline's parts (``python -m dalle3_fast.export --help``).

    from dalle3_fast.export import ORTDecoder, TRTDecoder, export_onnx, part_spec, verify_onnx
    from dalle3_fast.export.tensorrt import build_engine      # TRTDecoder and build_engine need tensorrt + a GPU
"""
from dalle3_fast.export.engine_decoder import EngineDecoder, ORTDecoder, TRTDecoder, use_decoder_engine
from dalle3_fast.export.graphs import PARTS, PartSpec, part_spec
from dalle3_fast.export.onnx_export import check_onnx, export_onnx, verify_onnx

__all__ = ["EngineDecoder", "ORTDecoder", "PARTS", "TRTDecoder", "PartSpec", "part_spec", "check_onnx", "export_onnx",
           "verify_onnx", "use_decoder_engine"]
