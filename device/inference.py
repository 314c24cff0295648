"""Running a .tflite classifier on the device: LiteRT (ai-edge-litert), or tflite_runtime where that is all there is.

The model takes one window of features and returns class probabilities. int8 models
are quantised and dequantised here with the scales stored in the model, so callers
always pass and receive floats.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class ModelLoadError(RuntimeError):
    """A model file that no TFLite runtime here can load."""


def interpreter_class():
    """LiteRT's Interpreter, or tflite_runtime's where that is all there is."""
    # Imported here, not at module level: a device without LiteRT may still have tflite_runtime.
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter
        except ImportError:
            raise ModelLoadError(
                "no TFLite runtime: install ai-edge-litert (or tflite-runtime, which needs numpy<2)"
            ) from None
    return Interpreter


class TfliteClassifier:
    """One .tflite model (or one signature of it): a window [frames, num_features] in, scores [labels] out.

    ``signature`` picks one model of a file that holds several (the command head beside the always-on model,
    firmware_tools/building/tflite_merge.py); None takes the first subgraph, which is the always-on model.
    """

    def __init__(self, model: str | Path | bytes, num_threads: int = 1, signature: str | None = None) -> None:
        runtime = interpreter_class()
        try:
            if isinstance(model, bytes):
                self._interpreter = runtime(model_content=model, num_threads=num_threads)
            else:
                self._interpreter = runtime(model_path=str(model), num_threads=num_threads)
            self._interpreter.allocate_tensors()
            if signature is None:
                (input_detail,) = self._interpreter.get_input_details()
                (output_detail,) = self._interpreter.get_output_details()
                self._runner = None
            else:
                self._runner = self._interpreter.get_signature_runner(signature)
                ((self._input_name, input_detail),) = self._runner.get_input_details().items()
                ((self._output_name, output_detail),) = self._runner.get_output_details().items()
        except (ValueError, RuntimeError) as error:
            raise ModelLoadError(f"cannot load TFLite model: {error}") from None
        self._input_index = input_detail["index"]
        self._output_index = output_detail["index"]
        self.input_shape = tuple(int(n) for n in input_detail["shape"][1:])
        """Shape of one window: (frames, num_features)."""
        self.num_labels = int(output_detail["shape"][-1])
        """Classes the model scores."""
        self.input_dtype = input_detail["dtype"]
        self._input_scale, self._input_zero = input_detail["quantization"]
        self._output_scale, self._output_zero = output_detail["quantization"]
        self.output_dtype = output_detail["dtype"]

    @property
    def quantized(self) -> bool:
        """True for a model with int8 input and output."""
        return self.input_dtype == np.int8

    def __call__(self, window: np.ndarray) -> np.ndarray:
        """Scores (float32) for one window: class probabilities, or a head's logits."""
        if window.shape != self.input_shape:
            raise ValueError(f"window shape {window.shape} does not match the model's {self.input_shape}")
        if self.quantized:
            scaled = np.round(window / self._input_scale + self._input_zero)
            tensor = np.clip(scaled, -128, 127).astype(np.int8)[np.newaxis]
        else:
            tensor = window.astype(np.float32)[np.newaxis]
        if self._runner is not None:
            output = self._runner(**{self._input_name: tensor})[self._output_name][0]
        else:
            self._interpreter.set_tensor(self._input_index, tensor)
            self._interpreter.invoke()
            output = self._interpreter.get_tensor(self._output_index)[0]
        if self.output_dtype == np.int8:
            return ((output.astype(np.float32) - self._output_zero) * self._output_scale).astype(np.float32)
        return output.astype(np.float32)

    def scores(self, windows: np.ndarray) -> np.ndarray:
        """Probabilities for many windows, [n, num_labels]."""
        return np.stack([self(window) for window in windows]) if len(windows) else np.zeros((0, self.num_labels))
