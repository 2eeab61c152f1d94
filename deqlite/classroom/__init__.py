"""The teaching kit: the exercises' checks (``checks``), deqlite's reference answers
(``references``) and the student notebooks generated from the solution notebooks (``student``;
``python -m deqlite.classroom student``).

    from deqlite.classroom import checks
    weight_tied_forward = checks.check_weight_tied_forward(weight_tied_forward)
"""
