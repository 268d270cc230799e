"""Renders a notification's subject, plain-text and HTML bodies from the jinja2 files.

Templates live in services/notifier/templates/<locale>/<kind>.{subject.txt,txt,html};
HTML templates are autoescaped, and every value from a command is reduced to one line
of printable text first (see domain.messages.single_line).
"""

from __future__ import annotations

import pathlib

import jinja2

from services.notifier.domain.messages import RenderedEmail, resolve_locale, single_line
from services.notifier.domain.model import Notification

TEMPLATES_DIR = pathlib.Path(__file__).resolve().parent.parent / "templates"


class TemplateRenderer:
    def __init__(self, directory: pathlib.Path = TEMPLATES_DIR) -> None:
        self._environment = jinja2.Environment(
            loader=jinja2.FileSystemLoader(directory),
            autoescape=jinja2.select_autoescape(enabled_extensions=("html",), default_for_string=False),
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=True,
            auto_reload=False,
        )
        # (locale, kind) -> its three compiled templates, looked up once (auto_reload is off).
        self._templates: dict[tuple[str, str], tuple[jinja2.Template, jinja2.Template, jinja2.Template]] = {}

    def _templates_for(self, locale: str, kind: str) -> tuple[jinja2.Template, jinja2.Template, jinja2.Template]:
        templates = self._templates.get((locale, kind))
        if templates is None:
            prefix = f"{locale}/{kind.lower()}"
            get = self._environment.get_template
            templates = self._templates[(locale, kind)] = (
                get(f"{prefix}.subject.txt"), get(f"{prefix}.txt"), get(f"{prefix}.html"))
        return templates

    def render(self, notification: Notification) -> RenderedEmail:
        locale = resolve_locale(notification.locale)
        course = single_line(notification.course_name) or single_line(notification.course_id)
        context = {
            "locale": locale,
            "name": single_line(notification.name),
            "course": course,
            "course_id": single_line(notification.course_id),
            "registration_id": single_line(notification.registration_id),
            "position": notification.waitlist_position,
        }
        subject_template, text_template, html_template = self._templates_for(locale, notification.kind.value)
        subject = single_line(subject_template.render(context), 900)
        text = text_template.render(context)
        html = html_template.render(context, subject=subject)
        return RenderedEmail(subject=subject, text=text, html=html)
