"""What the report says its numbers mean: chance, the untrained figures and the gain, from the results."""
from lcr_fast.results import reading_guide, training_markdown, training_summary

RESULTS = {"name": "run", "num_classes": 8, "knn_k": 20, "knn_t": 0.1, "knn_top1": 62.5,
           "retrieval": {"rank1": 0.55, "rank5": 0.9, "mAP": 0.4},
           "untrained": {"knn_top1": 25.0, "rank1": 0.3, "rank5": 0.7, "mAP": 0.16}}


def test_one_sentence_each_with_chance_untrained_and_gain():
    chance, knn, retrieval, untrained = reading_guide(RESULTS)
    assert chance.startswith("Chance: a guess among the 8 classes") and "12.50%" in chance
    assert "kNN top-1 62.50%" in knn and "20 training images" in knn and "5.0x chance" in knn
    assert "rank-1 55.00%" in retrieval and "mAP 40.00%" in retrieval
    assert "kNN top-1 25.00%, rank-1 30.00%, mAP 16.00%" in untrained
    assert "multiplied kNN top-1 by 2.5x and mAP by 2.5x" in untrained
    assert all(line.endswith(".") and line.count(". ") == 0 for line in (chance, knn, retrieval, untrained))


def test_the_guide_ends_the_report_and_the_console_summary():
    guide = reading_guide(RESULTS)
    assert training_markdown(RESULTS).rstrip().endswith("- " + guide[-1])
    assert "## What the numbers mean" in training_markdown(RESULTS)
    assert training_summary(RESULTS).splitlines()[-len(guide):] == guide


def test_what_is_missing_is_left_out():
    assert reading_guide({"knn_top1": 40.0, "knn_k": 5}) == [
        "kNN top-1 40.00%: how often the 5 training images nearest a test image (cosine similarity of pooled "
        "backbone features) vote for its class."]
    only_untrained = reading_guide({"untrained": RESULTS["untrained"]})
    assert only_untrained == ["Untrained: the same network before its first step scored kNN top-1 25.00%, "
                              "rank-1 30.00%, mAP 16.00%."]
    assert "What the numbers mean" not in training_markdown({"name": "run"})
