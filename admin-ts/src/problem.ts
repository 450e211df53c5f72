// RFC 9457 problem details, in the gateway's shape: `type`, `title`, `status`, `detail`, and for
// invalid configs `errors[]` with the path of each error.

export interface FieldError {
  /** Where in the config document, as the gateway writes it: `routes[3].upstream`. */
  path: string;
  message: string;
}

const TITLES: Record<number, [string, string]> = {
  400: ['bad-request', 'Bad request'],
  401: ['unauthorized', 'Unauthorized'],
  403: ['forbidden', 'Forbidden'],
  404: ['not-found', 'Not found'],
  405: ['method-not-allowed', 'Method not allowed'],
  406: ['not-acceptable', 'Not acceptable'],
  409: ['conflict', 'Conflict'],
  412: ['precondition-failed', 'Precondition failed'],
  413: ['payload-too-large', 'Payload too large'],
  415: ['unsupported-media-type', 'Unsupported media type'],
  422: ['invalid-config', 'Invalid config'],
  428: ['precondition-required', 'Precondition required'],
  500: ['internal', 'Internal error'],
  503: ['unavailable', 'Service unavailable'],
};

export class Problem extends Error {
  readonly status: number;
  readonly type: string;
  readonly title: string;
  readonly errors: FieldError[] | undefined;
  readonly headers: Record<string, string>;

  constructor(
    status: number,
    detail: string,
    options: { errors?: FieldError[]; type?: string; title?: string; headers?: Record<string, string> } = {},
  ) {
    super(detail);
    const [slug, title] = TITLES[status] ?? ['error', 'Error'];
    this.status = status;
    this.type = `urn:gatehouse:problem:${options.type ?? slug}`;
    this.title = options.title ?? title;
    this.errors = options.errors;
    this.headers = options.headers ?? {};
  }

  body(): Record<string, unknown> {
    return {
      type: this.type,
      title: this.title,
      status: this.status,
      detail: this.message,
      ...(this.errors ? { errors: this.errors } : {}),
    };
  }
}

export function invalidConfig(errors: FieldError[]): Problem {
  const count = errors.length;
  return new Problem(400, `${count} error${count === 1 ? '' : 's'} in config`, {
    errors,
    type: 'invalid-config',
    title: 'Invalid config',
  });
}

/** The JSON schema of a problem, for the OpenAPI document. */
export const problemSchema = {
  type: 'object',
  required: ['type', 'title', 'status'],
  properties: {
    type: { type: 'string' },
    title: { type: 'string' },
    status: { type: 'integer' },
    detail: { type: 'string' },
    errors: {
      type: 'array',
      items: {
        type: 'object',
        required: ['path', 'message'],
        properties: { path: { type: 'string' }, message: { type: 'string' } },
      },
    },
  },
} as const;
