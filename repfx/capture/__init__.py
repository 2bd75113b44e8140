"""Capture: a model or a model file -> the aten graph every later stage works on.

``export`` runs torch.export (or converts TorchScript) into a functional, eval-mode
GraphModule; ``loading`` reads model files without running code they carry;
``inputs`` holds every rule about example inputs (batch dims, synthesis from shapes);
``model_state`` says what the eval capture changes about the model as given;
``failure`` turns torch.export's errors into one actionable line.
"""
