"""The dashboard in a real headless Chromium against a real `openft serve` (API + worker): a user
enters a key, follows a training job's chart as it grows, pauses and resumes it with the buttons,
reads every step on the final chart, asks the fine-tuned model in the playground, and reads why
an image of a file was skipped."""

from __future__ import annotations

import csv
import io
import json

import httpx
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

from tests.integration.test_service_e2e import wait_for
from tests.tasks import (
    COLOURS,
    colour_examples,
    person_photo,
    picture_examples,
    picture_message,
    to_jsonl,
)
from tests.web.browser import screenshot, wait_until

pytestmark = pytest.mark.slow

N_EPOCHS = 40  # 120 examples / batch 8 -> 600 steps: long enough to pause and resume mid-run


def css(driver, testid: str):
    return driver.find_element(By.CSS_SELECTOR, f"[data-testid='{testid}']")


def chart_points(driver) -> int:
    return int(css(driver, "loss-chart").get_attribute("data-points"))


@pytest.fixture(scope="module")
def client(full_server):
    return full_server.client("dashboard")


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    return tmp_path_factory.mktemp("screenshots")


@pytest.fixture(scope="module")
def long_job(client):
    train = client.files.create(
        file=("colours.jsonl", io.BytesIO(to_jsonl(colour_examples(120, seed=1)))), purpose="fine-tune"
    )
    valid = client.files.create(
        file=("colours-valid.jsonl", io.BytesIO(to_jsonl(colour_examples(24, seed=2)))), purpose="fine-tune"
    )
    return client.fine_tuning.jobs.create(
        training_file=train.id,
        validation_file=valid.id,
        model="openft-tiny-vlm",
        suffix="colours",
        seed=3,
        method={
            "type": "supervised",
            "supervised": {"hyperparameters": {"n_epochs": N_EPOCHS, "batch_size": 8}},
        },
    )


def test_key_is_entered_and_kept_for_this_tab_only(browser, full_server, client, long_job, shots):
    browser.get(full_server.url + "/")
    assert css(browser, "api-key-input").is_displayed()
    screenshot(browser, "key", shots)
    css(browser, "api-key-input").send_keys(client.api_key)
    css(browser, "api-key-submit").click()
    wait_until(
        lambda: browser.find_elements(By.CSS_SELECTOR, "[data-testid='job-row']"), what="the jobs list"
    )
    rows = browser.find_elements(By.CSS_SELECTOR, "[data-testid='job-row']")
    assert long_job.id in [r.get_attribute("data-id") for r in rows]
    # which key is in use: the prefix `openft keys list` prints
    assert client.api_key[:14] in css(browser, "api-key-info").text
    assert browser.execute_script("return sessionStorage.getItem('openft-key')") == client.api_key
    assert browser.execute_script("return localStorage.length") == 0


def test_follow_pause_resume_and_the_final_chart_has_every_step(
    browser, full_server, client, long_job, shots
):
    browser.get(f"{full_server.url}/#/jobs/{long_job.id}")
    first = wait_until(
        lambda: chart_points(browser) >= 3 and chart_points(browser), what="first chart points"
    )
    wait_until(lambda: chart_points(browser) > first, what="the chart to grow")
    assert css(browser, "job-status").text == "running"
    assert "of 600" in css(browser, "job-progress").text
    screenshot(browser, "job-running", shots)

    css(browser, "job-pause").click()
    wait_until(lambda: css(browser, "job-status").text == "paused", what="the paused status")
    assert client.fine_tuning.jobs.retrieve(long_job.id).status == "paused"
    assert not css(browser, "job-pause").is_enabled() and css(browser, "job-resume").is_enabled()
    paused_at = chart_points(browser)
    assert paused_at < 600

    css(browser, "job-resume").click()
    wait_until(lambda: css(browser, "job-status").text != "paused", what="the job to leave paused")
    job = wait_for(client, long_job.id, timeout=1200)
    assert job.status == "succeeded", job.error
    wait_until(lambda: css(browser, "job-status").text == "succeeded", what="the succeeded status")

    # The chart holds every step: as many points as the metrics API and the results CSV have rows.
    headers = {"Authorization": f"Bearer {client.api_key}"}
    metrics = httpx.get(f"{full_server.base_url}/fine_tuning/jobs/{job.id}/metrics", headers=headers).json()
    steps = [m["step"] for m in metrics["data"]]
    assert steps == list(range(1, 601))
    results = list(csv.DictReader(io.StringIO(client.files.content(job.result_files[0]).text)))
    wait_until(lambda: chart_points(browser) == len(steps), what="every step on the chart", timeout=60)
    chart = css(browser, "loss-chart")
    assert len(results) == int(chart.get_attribute("data-points")) == 600
    valid_rows = [r for r in results if r["valid_loss"]]
    assert int(chart.get_attribute("data-valid-points")) == len(valid_rows) > 0
    assert "Step 600 of 600" in css(browser, "job-progress").text

    hp = css(browser, "job-hyperparameters")
    assert hp.find_element(By.CSS_SELECTOR, "tr[data-key='n_epochs'] td").text == str(N_EPOCHS)
    assert hp.find_element(By.CSS_SELECTOR, "tr[data-key='batch_size'] td").text == "8"
    ckpts = css(browser, "job-checkpoints")
    assert ckpts.find_element(By.CSS_SELECTOR, "tr[data-step='600']").text.startswith("600")

    # Every event, the first ones too: page back until the start of the job.
    while more := [b for b in browser.find_elements(By.ID, "events-more") if b.is_displayed()]:
        n = len(css(browser, "job-events").find_elements(By.TAG_NAME, "li"))
        more[0].click()
        wait_until(
            lambda n=n: len(css(browser, "job-events").find_elements(By.TAG_NAME, "li")) > n,
            what="older events",
        )
    shown = [li.text for li in css(browser, "job-events").find_elements(By.TAG_NAME, "li")]
    api_events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
    assert len(shown) == len(api_events)
    assert shown[-1].endswith(api_events[-1].message)  # the oldest event
    browser.execute_script("window.scrollTo(0, 0)")
    screenshot(browser, "job", shots)


def test_playground_asks_the_fine_tuned_model_beside_the_base(browser, full_server, client, long_job, shots):
    job = client.fine_tuning.jobs.retrieve(long_job.id)
    browser.get(f"{full_server.url}/#/jobs/{job.id}")
    link = wait_until(
        lambda: browser.find_element(By.CSS_SELECTOR, "#job-ft-model a.button"),
        what="the open-in-playground link",
    )
    link.click()
    wait_until(
        lambda: (
            Select(css(browser, "playground-model")).first_selected_option.get_attribute("value")
            == job.fine_tuned_model
        ),
        what="the fine-tuned model selected",
    )
    browser.find_element(By.ID, "pg-compare").click()
    Select(css(browser, "playground-model-b")).select_by_value("openft-tiny-vlm")
    for field, value in (("pg-temperature", "0"), ("pg-max-tokens", "4")):
        box = browser.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    (prompt, expected) = colour_examples(1, seed=99)[0]  # a filler arrangement never trained on
    css(browser, "playground-input").send_keys(prompt)
    css(browser, "playground-send").click()
    for testid in ("playground-answer", "playground-answer-b"):
        wait_until(
            lambda t=testid: css(browser, t).get_attribute("data-done") == "true", what=f"{testid} to finish"
        )
    answer = css(browser, "playground-answer")
    assert "error" not in answer.get_attribute("class")
    assert answer.text.strip() == expected and expected in COLOURS.values()
    assert "error" not in css(browser, "playground-answer-b").get_attribute("class")

    # An image from disk goes along with the next question, to both models.
    png = shots / "shape.png"
    png.write_bytes(picture_examples(1, seed=4)[0][0])
    browser.execute_script("document.getElementById('pg-image').hidden = false")
    browser.find_element(By.ID, "pg-image").send_keys(str(png))
    wait_until(
        lambda: browser.find_element(By.ID, "pg-image-preview").is_displayed(), what="the image preview"
    )
    browser.execute_script("document.getElementById('pg-image').hidden = true")
    css(browser, "playground-input").send_keys("What colour is the shape?")
    css(browser, "playground-send").click()
    for testid in ("playground-answer", "playground-answer-b"):
        wait_until(
            lambda t=testid: css(browser, t).get_attribute("data-done") == "true", what=f"{testid} to finish"
        )
        assert "error" not in css(browser, testid).get_attribute("class"), css(browser, testid).text
    sent = browser.find_elements(By.CSS_SELECTOR, "#pg-chat-a .msg.user img.thumb")
    assert len(sent) == 1 and sent[0].get_attribute("src").startswith("data:image/png;base64,")
    screenshot(browser, "playground", shots)


def test_file_report_shows_the_skipped_image_and_why(browser, full_server, client, shots):
    lines = [
        json.dumps({"messages": [picture_message(png), {"role": "assistant", "content": colour}]})
        for png, colour in picture_examples(11, seed=5)
    ]
    lines.insert(
        2,
        json.dumps({"messages": [picture_message(person_photo()), {"role": "assistant", "content": "red"}]}),
    )
    f = client.files.create(
        file=("pictures.jsonl", io.BytesIO(("\n".join(lines) + "\n").encode())), purpose="fine-tune"
    )
    browser.get(f"{full_server.url}/#/files/{f.id}")
    wait_until(
        lambda: [
            r
            for r in browser.find_elements(By.CSS_SELECTOR, "[data-testid='file-row']")
            if r.get_attribute("data-id") == f.id
        ],
        what="the file in the list",
    )
    report = css(browser, "file-validation")
    wait_until(lambda: report.get_attribute("data-state") == "done", what="the validation report")
    row = report.find_element(By.CSS_SELECTOR, "tr.sev-skip")
    assert row.get_attribute("data-code") in ("contains_people", "contains_faces")
    cells = row.find_elements(By.TAG_NAME, "td")
    assert cells[0].text == "3" and cells[1].text == "messages[0].content[1].image_url.url"
    assert "remove it" in cells[4].text and ("people" in cells[4].text or "faces" in cells[4].text)
    thumb = row.find_element(By.CSS_SELECTOR, "[data-testid='file-image-thumb']")
    assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", thumb) > 0
    stats = css(browser, "file-validation").find_element(By.ID, "file-summary").text
    assert "12\nexamples" in stats and "11\nusable" in stats and "1\nskipped" in stats
    screenshot(browser, "file", shots)
