"""Capture: a model or a model file -> the aten graph every later stage works on.

``export`` runs torch.export (or converts TorchScript) into a functional, eval-mode
GraphModule; ``loading`` reads model files without running code they carry (the checks
are ``pt2_safety`` and ``pickle_safety``); ``inputs`` holds every rule about example
inputs (normalising, user-input placeholders, symbolic sizes, batch dims, synthesis);
``model_state`` says what the eval capture changes about the model as given;
``failure`` turns torch.export's errors into one actionable line.
"""
