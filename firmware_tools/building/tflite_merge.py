"""Two TFLite models in one file, each behind its own signature.

A model package is one .tflite blob on the wire (signed, sent over the air, installed
whole). The always-on wake model and the command head are trained apart, so they are
joined here: the wake model stays the first subgraph, which is what
``Interpreter.invoke()`` runs and what a package without a head holds, and the
head becomes a second subgraph behind the signature :data:`HEAD_SIGNATURE`.

Nothing is recomputed: subgraphs, buffers and operator codes of the head are appended
to those of the wake model, with their indices moved past the wake model's. Training
only: it needs TensorFlow's flatbuffer tools.
"""

from __future__ import annotations

import copy

WAKE_SIGNATURE = "wake"
"""Signature of the always-on model (subgraph 0)."""
HEAD_SIGNATURE = "command_head"
"""Signature of the command head on the speech embedding."""


def merge_models(wake: bytes, head: bytes) -> bytes:
    """One flatbuffer: ``wake`` as subgraph 0 behind WAKE_SIGNATURE, ``head`` after it behind HEAD_SIGNATURE."""
    from tensorflow.lite.tools import flatbuffer_utils

    merged = flatbuffer_utils.convert_bytearray_to_object(bytearray(wake))
    extra = flatbuffer_utils.convert_bytearray_to_object(bytearray(head))
    if len(merged.signatureDefs or []) != 1 or len(extra.signatureDefs or []) != 1:
        raise ValueError("each model must have exactly one signature")
    subgraph_offset = len(merged.subgraphs)
    # Buffer 0 is the empty buffer every tensor without data points at; the head's others follow ours.
    buffer_offset = len(merged.buffers) - 1
    opcode_offset = len(merged.operatorCodes)
    merged.buffers += extra.buffers[1:]
    merged.operatorCodes += extra.operatorCodes
    for subgraph in extra.subgraphs:
        for tensor in subgraph.tensors:
            if tensor.buffer:
                tensor.buffer += buffer_offset
        for operator in subgraph.operators:
            operator.opcodeIndex += opcode_offset
        merged.subgraphs.append(subgraph)
    (wake_signature,) = merged.signatureDefs
    wake_signature.signatureKey = WAKE_SIGNATURE.encode()
    head_signature = copy.deepcopy(extra.signatureDefs[0])
    head_signature.signatureKey = HEAD_SIGNATURE.encode()
    head_signature.subgraphIndex += subgraph_offset
    merged.signatureDefs.append(head_signature)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(merged))


def always_on_part(merged: bytes) -> bytes:
    """The always-on model of a joined file, alone: subgraph 0, the buffers and operator codes it uses, its signature.

    What :func:`merge_models` joined, taken apart again, so that a new head can join the same always-on network.
    """
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(merged))
    wake = model.subgraphs[0]
    used_buffers = sorted(
        {0}
        | {tensor.buffer for tensor in wake.tensors if tensor.buffer}
        | {entry.buffer for entry in model.metadata or ()}
    )
    buffer_index = {old: new for new, old in enumerate(used_buffers)}
    used_codes = sorted({operator.opcodeIndex for operator in wake.operators})
    code_index = {old: new for new, old in enumerate(used_codes)}
    for tensor in wake.tensors:
        tensor.buffer = buffer_index[tensor.buffer]
    for operator in wake.operators:
        operator.opcodeIndex = code_index[operator.opcodeIndex]
    for entry in model.metadata or ():
        entry.buffer = buffer_index[entry.buffer]
    model.buffers = [model.buffers[old] for old in used_buffers]
    model.operatorCodes = [model.operatorCodes[old] for old in used_codes]
    model.subgraphs = [wake]
    model.signatureDefs = [signature for signature in model.signatureDefs if signature.subgraphIndex == 0]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))
