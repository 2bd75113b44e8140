"""Deploy: the verified plain graph lowered (``compile``) or written as files (``export``).

``staging`` makes writes all-or-nothing and never touches files repfx did not write;
``triton`` lays out model repository entries; ``weight_range`` checks folded weights
against fp16/bf16.
"""
