"""Forward-only work at the machine's speed: the frozen layers through an inference engine
(``engine.py``, OpenVINO in ``openvino_graph.py``) and the numeric precision (``precision.py``)."""
