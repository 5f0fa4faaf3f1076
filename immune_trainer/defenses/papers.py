"""Papers cited by more than one defense (each defense's trainer names its own in ``_paper``)."""

REPNOISE_PAPER = {
    "title": "Representation noising: A defence mechanism against harmful finetuning",
    "id": "2405.14577",
    "citation": (
        "@inproceedings{rosati2024representation,\n"
        "  title={Representation noising: A defence mechanism against harmful finetuning},\n"
        "  author={Rosati, Domenic and Wehner, Jan and Williams, Kai and Bartoszcze, {\\L}ukasz and "
        "Gonzales, Robie and Maple, Carsten and Majumdar, Subhabrata and Sajjad, Hassan and Rudzicz, Frank},\n"
        "  booktitle={Advances in Neural Information Processing Systems},\n"
        "  year={2024}\n}"
    ),
}
